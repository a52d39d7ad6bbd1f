"""Readers of public evaluation files (COCO instances, VOC2007, NUS-WIDE, label lists, VQAv2,
RefCOCO as JSON and as pickle) on small files written here, the pickle converter and its CLI, and
the restricted unpickler refusing a pickle that carries code."""

import json
import os
import pickle

import numpy as np
import pytest

from bigvl.evaluators import public_formats as pf
from data_pipelines import refcoco_to_json


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def write_json(path, obj):
  return write(path, json.dumps(obj))


def one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


# ---------------------------------------------------------------------------------------- COCO
COCO = {
    "images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"},
               {"id": 12, "file_name": "empty.jpg"}],
    "annotations": [{"id": 1, "image_id": 10, "category_id": 7},
                    {"id": 2, "image_id": 10, "category_id": 1},
                    {"id": 3, "image_id": 11, "category_id": 7},
                    {"id": 4, "image_id": 11, "category_id": 7, "iscrowd": 1}],
    "categories": [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"},
                   {"id": 3, "name": "car"}],
}


def test_coco_instances(tmp_path):
  path = write_json(tmp_path / "ann" / "instances.json", COCO)
  got = pf.coco_instances(path)
  assert got.names == ["person", "car", "dog"]                    # category-id order
  assert got.image_paths == [str(tmp_path / "ann" / n) for n in ("a.jpg", "b.jpg", "empty.jpg")]
  np.testing.assert_array_equal(got.labels, [[1, 0, 1], [0, 0, 1], [0, 0, 0]])
  assert got.labels.dtype == np.int8
  skipped = pf.coco_instances(path, image_root="/imgs", skip_empty=True)
  assert skipped.image_paths == ["/imgs/a.jpg", "/imgs/b.jpg"]
  np.testing.assert_array_equal(skipped.labels, got.labels[:2])


@pytest.mark.parametrize("edit, culprit", [
    (lambda d: d.pop("categories"), "'categories'"),
    (lambda d: d["annotations"][1].update(category_id="1"), "annotation 2"),
    (lambda d: d["annotations"][0].update(image_id=99), "image_id 99"),
    (lambda d: d["images"][0].pop("file_name"), "'file_name'"),
    (lambda d: d.update(images={}), "'images' of type dict"),
])
def test_coco_malformed(tmp_path, edit, culprit):
  data = json.loads(json.dumps(COCO))
  edit(data)
  path = write_json(tmp_path / "instances.json", data)
  with pytest.raises(ValueError) as e:
    pf.coco_instances(path)
  one_line_error(e, path, culprit)
  bad = write(tmp_path / "broken.json", '{"images": [')
  with pytest.raises(ValueError) as e:
    pf.coco_instances(bad)
  one_line_error(e, bad, "not JSON")


# ----------------------------------------------------------------------------------------- VOC
def write_voc(root, split="test", skip=()):
  ids = ["000001", "000004", "000007"]
  for c, name in enumerate(pf.VOC_CLASSES):
    if name in skip:
      continue
    values = [["1", "-1", "-1"], ["-1", " 0", "1"], ["-1", "-1", "-1"]][c % 3]
    write(os.path.join(root, "ImageSets", "Main", f"{name}_{split}.txt"),
          "".join(f"{i} {v}\n" for i, v in zip(ids, values)))


def test_voc2007(tmp_path):
  root = str(tmp_path / "VOC2007")
  write_voc(root)
  got = pf.voc2007(root)
  assert got.names == list(pf.VOC_CLASSES) and len(got.names) == 20
  assert got.names[0] == "aeroplane" and got.names[-1] == "tvmonitor"
  assert got.image_paths[1] == os.path.join(root, "JPEGImages", "000004.jpg")
  assert got.labels.shape == (3, 20)
  np.testing.assert_array_equal(got.labels[:, :3], [[1, 0, 0], [0, -1, 0], [0, 1, 0]])


def test_voc2007_missing_and_malformed(tmp_path):
  root = str(tmp_path / "VOC2007")
  write_voc(root, skip=("cat",))
  with pytest.raises(FileNotFoundError) as e:
    pf.voc2007(root)
  one_line_error(e, "cat_test.txt", "'cat'")
  assert isinstance(e.value, ValueError)
  bad = write(os.path.join(root, "ImageSets", "Main", "cat_test.txt"), "000001 1\n000004 2\n")
  with pytest.raises(ValueError) as e:
    pf.voc2007(root)
  one_line_error(e, bad, "line 2")
  write(bad, "000001 1\n000004 0\n")
  with pytest.raises(ValueError) as e:
    pf.voc2007(root)
  one_line_error(e, bad, "lacks image 000007")


# ------------------------------------------------------------------------------------ NUS-WIDE
def test_nus_wide(tmp_path):
  root = str(tmp_path / "nus")
  write(os.path.join(root, "Concepts81.txt"), "airport\nanimal\r\nbeach\n")
  write(os.path.join(root, "ImageList", "TestImagelist.txt"),
        "actor\\0001_2124494179.jpg\nbeach\\0002_1.jpg\nzoo/0003_2.jpg\n")
  labels = {"airport": "0\n1\n0\n", "animal": "1 \n1\n0\n", "beach": "0\n1\n0\n"}
  for c, text in labels.items():
    write(os.path.join(root, "TrainTestLabels", f"Labels_{c}_Test.txt"), text)
  got = pf.nus_wide(root)
  assert got.names == ["airport", "animal", "beach"]
  assert got.image_paths[0] == os.path.join(root, "Flickr", "actor/0001_2124494179.jpg")
  np.testing.assert_array_equal(got.labels, [[0, 1, 0], [1, 1, 1], [0, 0, 0]])
  dropped = pf.nus_wide(root, image_root="/flickr", skip_empty=True)
  assert dropped.image_paths == ["/flickr/actor/0001_2124494179.jpg", "/flickr/beach/0002_1.jpg"]
  short = write(os.path.join(root, "TrainTestLabels", "Labels_beach_Test.txt"), "0\n1\n")
  with pytest.raises(ValueError) as e:
    pf.nus_wide(root)
  one_line_error(e, short, "2 labels for the 3 images")
  with pytest.raises(FileNotFoundError) as e:
    pf.nus_wide(root, split="Train")
  one_line_error(e, "TrainImagelist.txt")


def test_label_list(tmp_path):
  path = write(tmp_path / "lists" / "val.tsv",
               "a/1.jpg\tdog,cat\nb/2.jpg\t\n/abs/3.jpg\t cat \n")
  got = pf.label_list(path)
  assert got.names == ["cat", "dog"]
  assert got.image_paths == [str(tmp_path / "lists" / "a/1.jpg"),
                             str(tmp_path / "lists" / "b/2.jpg"), "/abs/3.jpg"]
  np.testing.assert_array_equal(got.labels, [[1, 1], [0, 0], [1, 0]])
  named = pf.label_list(path, names=["dog", "cat", "bird"])
  np.testing.assert_array_equal(named.labels, [[1, 1, 0], [0, 0, 0], [0, 1, 0]])
  with pytest.raises(ValueError) as e:
    pf.label_list(path, names=["dog"])
  one_line_error(e, path, "'cat'")
  bad = write(tmp_path / "bad.tsv", "a.jpg\tdog\nb.jpg dog\n")
  with pytest.raises(ValueError) as e:
    pf.label_list(bad)
  one_line_error(e, bad, "line 2")


# --------------------------------------------------------------------------------------- VQAv2
def vqa_files(tmp_path, subtype="val2014"):
  questions = {"data_subtype": subtype, "questions": [
      {"image_id": 42, "question": "How many dogs?", "question_id": 420},
      {"image_id": 7, "question": "What color?", "question_id": 70}]}
  answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
             for i, a in enumerate(["2"] * 6 + ["3"] * 4)]
  annotations = {"annotations": [
      {"question_id": 420, "image_id": 42, "answers": answers, "multiple_choice_answer": "2",
       "answer_type": "number", "question_type": "how many"}]}
  q = write_json(tmp_path / "q.json", questions)
  a = write_json(tmp_path / "a.json", annotations)
  return q, a, annotations


def test_vqa_v2(tmp_path):
  q, a, _ = vqa_files(tmp_path)
  rows = pf.vqa_v2(q, a, image_root="/coco/val2014")
  assert [r["question_id"] for r in rows] == [420, 70]
  first = rows[0]
  assert first["image"] == "/coco/val2014/COCO_val2014_000000000042.jpg"
  assert first["answers"] == ["2"] * 6 + ["3"] * 4
  assert (first["question"], first["image_id"]) == ("How many dogs?", 42)
  assert (first["answer_type"], first["question_type"]) == ("number", "how many")
  assert rows[1]["answers"] == [] and rows[1]["answer_type"] is None
  custom = pf.vqa_v2(q, a, image_root="/coco",
                     image_pattern="{subtype}/COCO_{subtype}_{image_id:012d}.jpg")
  assert custom[1]["image"] == "/coco/val2014/COCO_val2014_000000000007.jpg"
  dev, _, _ = vqa_files(tmp_path / "dev", subtype="test-dev2015")
  rows = pf.vqa_v2(dev)
  assert rows[0]["image"] == str(tmp_path / "dev" / "COCO_test2015_000000000042.jpg")
  assert all(r["answers"] == [] for r in rows)


def test_vqa_v2_malformed(tmp_path):
  q, _, annotations = vqa_files(tmp_path)
  annotations["annotations"][0]["answers"][3] = {"answer": 3}
  a = write_json(tmp_path / "bad_a.json", annotations)
  with pytest.raises(ValueError) as e:
    pf.vqa_v2(q, a)
  one_line_error(e, a, "question 420", "'answer'")
  del annotations["annotations"][0]["answers"]
  a = write_json(tmp_path / "bad_a.json", annotations)
  with pytest.raises(ValueError) as e:
    pf.vqa_v2(q, a)
  one_line_error(e, a, "'answers'")
  nq = write_json(tmp_path / "nq.json", {"questions": [{"image_id": 1, "question_id": 2}]})
  with pytest.raises(ValueError) as e:
    pf.vqa_v2(nq, image_pattern="{image_id}.jpg")
  one_line_error(e, nq, "'question'")
  with pytest.raises(ValueError) as e:
    pf.vqa_v2(write_json(tmp_path / "ns.json", {"questions": []}))
  one_line_error(e, "ns.json", "data_subtype")


# ------------------------------------------------------------------------------------- RefCOCO
REFS = [
    {"ref_id": 5, "ann_id": 101, "image_id": 1, "split": "val", "category_id": 1,
     "file_name": "COCO_train2014_000000000001_101.jpg",
     "sentences": [{"sent": "man on left", "raw": "Man on left."}, {"raw": "guy in red"}]},
    {"ref_id": 6, "ann_id": 201, "image_id": 2, "split": "testA", "category_id": 1,
     "sentences": [{"sent": "woman"}]},
    {"ref_id": 7, "ann_id": 103, "image_id": 1, "split": "val", "category_id": 18,
     "sentences": [{"sent": "the dog"}]},
]
INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"}],
    "annotations": [{"id": 101, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 1},
                    {"id": 201, "image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 1},
                    {"id": 102, "image_id": 1, "bbox": [1.5, 2.5, 3, 4], "category_id": 1},
                    {"id": 103, "image_id": 1, "bbox": [50, 60, 10, 10], "category_id": 18}],
}


def check_refcoco_rows(rows):
  assert [(r["ref_id"], r["sentence"]) for r in rows] == [
      (5, "man on left"), (5, "guy in red"), (7, "the dog")]
  assert rows[0]["image"] == "/coco/train2014/COCO_train2014_000000000001.jpg"
  assert rows[0]["box"] == (10.0, 20.0, 40.0, 60.0)
  np.testing.assert_array_equal(rows[0]["candidates"],
                                [[10, 20, 40, 60], [1.5, 2.5, 4.5, 6.5], [50, 60, 60, 70]])
  assert rows[0]["candidates"].shape == (3, 4) and rows[0]["target"] == 0
  assert rows[2]["target"] == 2
  assert tuple(rows[2]["candidates"][rows[2]["target"]]) == rows[2]["box"]


def test_refcoco_json_and_pickle(tmp_path):
  inst = write_json(tmp_path / "refcoco" / "instances.json", INSTANCES)
  refs_json = write_json(tmp_path / "refcoco" / "refs.json", REFS)
  check_refcoco_rows(pf.refcoco(refs_json, inst, split="val", image_root="/coco/train2014"))
  for protocol in (2, pickle.HIGHEST_PROTOCOL):
    refs_p = str(tmp_path / "refcoco" / f"refs(unc){protocol}.p")
    with open(refs_p, "wb") as f:
      pickle.dump(REFS, f, protocol=protocol)
    check_refcoco_rows(pf.refcoco(refs_p, inst, split="val", image_root="/coco/train2014"))
  rows = pf.refcoco(refs_json, inst, split="testA")
  assert rows[0]["image"] == str(tmp_path / "refcoco" / "COCO_train2014_000000000002.jpg")
  with pytest.raises(ValueError) as e:
    pf.refcoco(refs_json, inst, split="testB")
  one_line_error(e, refs_json, "'testB'", "testA")


def test_refcoco_converter_and_cli(tmp_path, capsys):
  inst = write_json(tmp_path / "instances.json", INSTANCES)
  refs_p = str(tmp_path / "refs(unc).p")
  with open(refs_p, "wb") as f:
    pickle.dump(REFS, f, protocol=2)
  out = str(tmp_path / "refs_unc.json")
  assert pf.refcoco_pickle_to_json(refs_p, out) == 3
  with open(out, encoding="utf-8") as f:
    assert json.load(f) == REFS
  check_refcoco_rows(pf.refcoco(out, inst, image_root="/coco/train2014"))
  cli_out = str(tmp_path / "cli.json")
  assert refcoco_to_json.main([f"--refs={refs_p}", f"--out={cli_out}"]) == 0
  assert "wrote 3 refs" in capsys.readouterr().out
  with open(cli_out, encoding="utf-8") as f:
    assert json.load(f) == REFS


@pytest.mark.parametrize("edit, culprit", [
    (lambda refs, inst: refs[0].pop("ann_id"), "'ann_id'"),
    (lambda refs, inst: refs[0].update(sentences="man"), "'sentences' of type str"),
    (lambda refs, inst: refs[0].update(ann_id=999), "ann_id 999"),
    (lambda refs, inst: inst["annotations"][0].update(bbox=[1, 2, 3]), "annotation 101"),
])
def test_refcoco_malformed(tmp_path, edit, culprit):
  refs, inst = json.loads(json.dumps(REFS)), json.loads(json.dumps(INSTANCES))
  edit(refs, inst)
  refs_path = write_json(tmp_path / "refs.json", refs)
  inst_path = write_json(tmp_path / "instances.json", inst)
  with pytest.raises(ValueError) as e:
    pf.refcoco(refs_path, inst_path)
  one_line_error(e, culprit)
  assert "refs.json" in str(e.value) or "instances.json" in str(e.value)


# ------------------------------------------------------------------------------------- pickles
class Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"echo pwned > {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path, capfd):
  marker = tmp_path / "pwned.txt"
  path = str(tmp_path / "refs(unc).p")
  with open(path, "wb") as f:
    pickle.dump([{"ref_id": 1, "payload": Evil(str(marker))}], f, protocol=2)
  for load in (pf.restricted_pickle_load, lambda p: pf.refcoco(p, p),
               lambda p: pf.refcoco_pickle_to_json(p, str(tmp_path / "out.json"))):
    with pytest.raises(pf.UnsafePickleError) as e:
      load(path)
    one_line_error(e, path, f"{os.system.__module__}.system")
  assert not marker.exists()
  assert not (tmp_path / "out.json").exists()
  assert refcoco_to_json.main([f"--refs={path}", f"--out={tmp_path / 'o.json'}"]) == 2
  assert "refused global" in capfd.readouterr().err
  assert not marker.exists()


def test_restricted_pickle_plain_values_and_refusals(tmp_path):
  plain = {"a": [1, 2.5, None, True], "b": ("x", b"\x00\x01"), "c": {3, 4}}
  path = str(tmp_path / "plain.pkl")
  with open(path, "wb") as f:
    pickle.dump(plain, f, protocol=pickle.HIGHEST_PROTOCOL)
  assert pf.restricted_pickle_load(path) == plain
  # A Python 2 pickle (as refs(unc).p is): its byte strings come back as text.
  with open(path, "wb") as f:
    f.write(b"\x80\x02}q\x00(U\x04sentq\x01U\x05helloq\x02U\x03idsK\x07u.")
  assert pf.restricted_pickle_load(path) == {"sent": "hello", "ids": 7}
  import collections
  with open(path, "wb") as f:
    pickle.dump(collections.OrderedDict(a=1), f)
  with pytest.raises(pf.UnsafePickleError) as e:
    pf.restricted_pickle_load(path)
  one_line_error(e, path, "collections.OrderedDict")
  with open(path, "wb") as f:
    f.write(pickle.dumps([1, 2, 3])[:-3])
  with pytest.raises(ValueError) as e:
    pf.restricted_pickle_load(path)
  one_line_error(e, path, "not a readable pickle")
