"""Readers of public evaluation files (COCO, VOC2007, NUS-WIDE, VQAv2, RefCOCO/+/g) into plain
Python and numpy: labels, questions, boxes and image file paths. No image is opened here.

Multi-label sets come back as a `LabelSet`: labels[i, j] is 1 (image i shows class j), 0 (it does
not) or -1 (ignored: VOC's "difficult"), the convention of `bigvl.evaluators.multilabel_metrics`.

Decisions:
  * Relative image paths resolve against `image_root`, which defaults to the folder of the file
    that names the images (NUS-WIDE: root/Flickr, VOC: root/JPEGImages); rows keep file order.
  * COCO images without any annotation stay, with all-zero rows (they are true negatives for
    every class; ML-GCN-style splits drop them: `skip_empty=True`). Crowd annotations count.
  * Malformed content raises a one-line ValueError "<file>: <what is wrong>"; a missing file
    raises `MissingFileError`, both a FileNotFoundError and a ValueError.
  * Pickles (RefCOCO's refs(unc).p and kin) load only through `restricted_pickle_load`, which
    builds plain containers and primitives and refuses every class or function a pickle names.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from typing import Any, Sequence, Union

import numpy as np

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor")
_VOC_VALUES = {"1": 1, "-1": 0, "0": -1}   # VOC: 1 positive, -1 negative, 0 difficult (ignored)
PathLike = Union[str, os.PathLike]


class MissingFileError(FileNotFoundError, ValueError):
  """A file the reader needs does not exist (its message names it)."""


class UnsafePickleError(ValueError):
  """A pickle names a global (a class or function), which `restricted_pickle_load` refuses."""


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSet:
  """Multi-label ground truth: image_paths (N), names (C, class order), labels (N, C) int8 in
  {1 positive, 0 negative, -1 ignored}."""
  image_paths: list[str]
  names: list[str]
  labels: np.ndarray

  def __post_init__(self):
    shape = (len(self.image_paths), len(self.names))
    if self.labels.shape != shape or self.labels.dtype != np.int8:
      raise ValueError(f"LabelSet labels must be int8 of shape {shape}, got "
                       f"{self.labels.dtype} {self.labels.shape}")

  def drop_empty(self) -> LabelSet:
    """The images with at least one positive label."""
    keep = np.flatnonzero(np.any(self.labels == 1, axis=1))
    return LabelSet([self.image_paths[i] for i in keep], list(self.names), self.labels[keep])


# ------------------------------------------------------------------------------------- helpers
def _fail(path: str, message: str) -> ValueError:
  return ValueError(f"{path}: {message}")


def _read_text(path: str, what: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise MissingFileError(f"{path}: {what} not found") from None
  except UnicodeDecodeError as e:
    raise _fail(path, f"not UTF-8 text (byte {e.start})") from None


def _lines(path: str, what: str, strip: bool = True) -> list[tuple[int, str]]:
  """(1-based line number, line) of the non-blank lines, stripped unless `strip` is False."""
  text = _read_text(path, what)
  return [(i, s.strip() if strip else s) for i, s in enumerate(text.splitlines(), 1) if s.strip()]


def _read_json(path: str, what: str) -> Any:
  text = _read_text(path, what)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise _fail(path, f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _kind(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _field(obj: Any, key: str, types: type | tuple[type, ...], path: str, where: str) -> Any:
  """obj[key], which must be of `types` (bool never counts as a number)."""
  if not isinstance(obj, dict):
    raise _fail(path, f"{where} is a {_kind(obj)}, expected an object")
  if key not in obj:
    raise _fail(path, f"{where} has no {key!r}")
  value = obj[key]
  numeric = types in (int, float, (int, float))
  if not isinstance(value, types) or (numeric and isinstance(value, bool)):
    names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
    raise _fail(path, f"{where} has {key!r} of type {_kind(value)}, expected {names}")
  return value


def _list_field(obj: Any, key: str, path: str, where: str = "the top level") -> list:
  return _field(obj, key, list, path, where)


def _join(root: str, relative: str) -> str:
  return os.path.join(root, relative) if root else relative


def _label_matrix(rows: int, cols: int) -> np.ndarray:
  return np.zeros((rows, cols), dtype=np.int8)


# ------------------------------------------------------------------------------ multi-label sets
def coco_instances(path: PathLike, image_root: PathLike = "", skip_empty: bool = False
                   ) -> LabelSet:
  """COCO instances JSON (images, annotations, categories) as image-level labels.

  Args:
    path: e.g. annotations/instances_val2014.json.
    image_root: folder of the images' file_name; default the JSON's folder.
    skip_empty: drop images without any annotation (kept as all-zero rows by default).
  Returns:
    A LabelSet whose classes are the categories in id order (80 for COCO 2014/2017).
  """
  path = os.fspath(path)
  root = os.fspath(image_root) or os.path.dirname(path)
  data = _read_json(path, "COCO instances file")
  categories = _list_field(data, "categories", path)
  images = _list_field(data, "images", path)
  annotations = _list_field(data, "annotations", path)
  cats: dict[int, str] = {}
  for i, c in enumerate(categories):
    cid = _field(c, "id", int, path, f"categories[{i}]")
    if cid in cats:
      raise _fail(path, f"category id {cid} appears twice")
    cats[cid] = _field(c, "name", str, path, f"categories[{i}]")
  column = {cid: j for j, cid in enumerate(sorted(cats))}
  row: dict[int, int] = {}
  paths = []
  for i, im in enumerate(images):
    iid = _field(im, "id", int, path, f"images[{i}]")
    if iid in row:
      raise _fail(path, f"image id {iid} appears twice")
    row[iid] = i
    paths.append(_join(root, _field(im, "file_name", str, path, f"images[{i}]")))
  labels = _label_matrix(len(paths), len(column))
  for i, a in enumerate(annotations):
    aid = a.get("id") if isinstance(a, dict) else None
    where = f"annotation {aid}" if aid is not None else f"annotations[{i}]"
    iid = _field(a, "image_id", int, path, where)
    cid = _field(a, "category_id", int, path, where)
    if iid not in row:
      raise _fail(path, f"{where} has image_id {iid}, which no image has")
    if cid not in column:
      raise _fail(path, f"{where} has category_id {cid}, which no category has")
    labels[row[iid], column[cid]] = 1
  out = LabelSet(paths, [cats[c] for c in sorted(cats)], labels)
  return out.drop_empty() if skip_empty else out


def voc2007(root: PathLike, split: str = "test", classes: Sequence[str] = VOC_CLASSES
            ) -> LabelSet:
  """PASCAL VOC2007 image labels from root/ImageSets/Main/{class}_{split}.txt.

  Each line is "<image id> <1|-1|0>": 1 positive -> 1, -1 negative -> 0, 0 difficult -> -1
  (ignored). Images are root/JPEGImages/<id>.jpg in the first class file's order; every class file
  must list the same ids.
  """
  root = os.fspath(root)
  ids: list[str] = []
  columns = []
  for name in classes:
    path = os.path.join(root, "ImageSets", "Main", f"{name}_{split}.txt")
    values: dict[str, int] = {}
    for number, line in _lines(path, f"VOC2007 class file for {name!r}"):
      parts = line.split()
      if len(parts) != 2 or parts[1] not in _VOC_VALUES:
        raise _fail(path, f"line {number} is {line!r:.60}, expected '<image id> <1|-1|0>'")
      if parts[0] in values:
        raise _fail(path, f"image {parts[0]} appears twice (line {number})")
      values[parts[0]] = _VOC_VALUES[parts[1]]
    if not columns:
      ids = list(values)
    elif values.keys() != set(ids):
      extra = sorted(values.keys() - set(ids))
      missing = sorted(set(ids) - values.keys())
      culprit = f"has image {extra[0]}" if extra else f"lacks image {missing[0]}"
      raise _fail(path, f"{culprit}, unlike {classes[0]}_{split}.txt")
    columns.append([values[i] for i in ids])
  labels = np.array(columns, dtype=np.int8).T.reshape(len(ids), len(columns))
  paths = [os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids]
  return LabelSet(paths, list(classes), labels)


def nus_wide(root: PathLike, split: str = "Test", image_root: PathLike = "",
             skip_empty: bool = False) -> LabelSet:
  """NUS-WIDE's 81-concept labels in the release's layout.

  root/Concepts81.txt: one concept a line; root/ImageList/{split}Imagelist.txt: one image path a
  line (backslashes become "/"); root/TrainTestLabels/Labels_{concept}_{split}.txt: one 0/1 a
  line, in image-list order. Images resolve against `image_root`, default root/Flickr.
  skip_empty drops images with no concept (as many papers' NUS-WIDE splits do).
  """
  root = os.fspath(root)
  images = os.fspath(image_root) or os.path.join(root, "Flickr")
  concepts_path = os.path.join(root, "Concepts81.txt")
  concepts = [line for _, line in _lines(concepts_path, "NUS-WIDE concept list")]
  if len(set(concepts)) != len(concepts):
    dup = next(c for c in concepts if concepts.count(c) > 1)
    raise _fail(concepts_path, f"concept {dup!r} appears twice")
  list_path = os.path.join(root, "ImageList", f"{split}Imagelist.txt")
  paths = [_join(images, line.replace("\\", "/"))
           for _, line in _lines(list_path, "NUS-WIDE image list")]
  labels = _label_matrix(len(paths), len(concepts))
  for j, concept in enumerate(concepts):
    path = os.path.join(root, "TrainTestLabels", f"Labels_{concept}_{split}.txt")
    lines = _lines(path, f"NUS-WIDE label file for {concept!r}")
    if len(lines) != len(paths):
      raise _fail(path, f"has {len(lines)} labels for the {len(paths)} images of {list_path}")
    for i, (number, line) in enumerate(lines):
      if line not in ("0", "1"):
        raise _fail(path, f"line {number} is {line!r:.40}, expected 0 or 1")
      labels[i, j] = line == "1"
  out = LabelSet(paths, concepts, labels)
  return out.drop_empty() if skip_empty else out


def label_list(path: PathLike, names: Sequence[str] | None = None, image_root: PathLike = ""
               ) -> LabelSet:
  """A plain text label list: lines "relative/image.jpg<TAB>label1,label2" (labels may be empty).

  Args:
    path: the list file.
    names: the classes in column order; default the sorted union of the labels seen.
    image_root: folder of relative image paths; default the list's folder.
  """
  path = os.fspath(path)
  root = os.fspath(image_root) or os.path.dirname(path)
  paths, sets = [], []
  for number, line in _lines(path, "label list", strip=False):
    if "\t" not in line:
      raise _fail(path, f"line {number} has no tab between image and labels: {line!r:.60}")
    image, _, labels = line.partition("\t")
    paths.append(_join(root, image.strip()))
    sets.append([s.strip() for s in labels.split(",") if s.strip()])
  if names is None:
    names = sorted({s for labels in sets for s in labels})
  names = list(names)
  if len(set(names)) != len(names):
    raise _fail(path, f"names given twice: {sorted({n for n in names if names.count(n) > 1})}")
  column = {n: j for j, n in enumerate(names)}
  out = _label_matrix(len(paths), len(names))
  for i, labels in enumerate(sets):
    for s in labels:
      if s not in column:
        raise _fail(path, f"image {paths[i]!r} has label {s!r}, which is not among the names")
      out[i, column[s]] = 1
  return LabelSet(paths, names, out)


# --------------------------------------------------------------------------------------- VQAv2
def _image_subtype(data_subtype: str) -> str:
  """The image set a question subtype's images are named after (test-dev2015 -> test2015)."""
  return "test" + data_subtype[len("test-dev"):] if data_subtype.startswith("test-dev") else (
      data_subtype)


def vqa_v2(questions_path: PathLike, annotations_path: PathLike = "", image_root: PathLike = "",
           image_pattern: str = "") -> list[dict]:
  """VQAv2 questions (and, where given, their annotations), one row per question in file order.

  Args:
    questions_path: v2_OpenEnded_mscoco_{subtype}_questions.json.
    annotations_path: v2_mscoco_{subtype}_annotations.json; none (test, test-dev): answers [].
    image_root: folder of the images; default the questions file's folder.
    image_pattern: image path under image_root, a str.format pattern with fields image_id and
      subtype; default "COCO_{subtype}_{image_id:012d}.jpg". subtype is the questions file's
      data_subtype, except that test-dev2015 becomes test2015 (its images are test2015's).
  Returns:
    Rows {"question_id", "image_id", "image", "question", "answers" (the 10 human answers or []),
    "answer_type", "question_type"} (the two types None without annotations). Annotations of
    questions the questions file lacks are ignored.
  """
  qpath = os.fspath(questions_path)
  root = os.fspath(image_root) or os.path.dirname(qpath)
  data = _read_json(qpath, "VQA questions file")
  questions = _list_field(data, "questions", qpath)
  subtype = data.get("data_subtype") if isinstance(data, dict) else None
  pattern = image_pattern or "COCO_{subtype}_{image_id:012d}.jpg"
  if "{subtype" in pattern and not isinstance(subtype, str):
    raise _fail(qpath, "has no string 'data_subtype' to name images by (pass image_pattern)")
  image_subtype = _image_subtype(subtype) if isinstance(subtype, str) else None
  annotations: dict[int, dict] = {}
  apath = os.fspath(annotations_path)
  if apath:
    adata = _read_json(apath, "VQA annotations file")
    for i, a in enumerate(_list_field(adata, "annotations", apath)):
      qid = _field(a, "question_id", int, apath, f"annotations[{i}]")
      where = f"the annotation of question {qid}"
      _field(a, "image_id", int, apath, where)
      answers = _list_field(a, "answers", apath, where)
      a = dict(a, answers=[_field(x, "answer", str, apath, f"an answer of question {qid}")
                           for x in answers])
      for key in ("answer_type", "question_type"):
        if a.get(key) is not None:
          _field(a, key, str, apath, where)
      annotations[qid] = a
  rows = []
  for i, q in enumerate(questions):
    qid = _field(q, "question_id", int, qpath, f"questions[{i}]")
    where = f"question {qid}"
    iid = _field(q, "image_id", int, qpath, where)
    text = _field(q, "question", str, qpath, where)
    try:
      image = pattern.format(image_id=iid, subtype=image_subtype)
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"image_pattern {pattern!r}: {type(e).__name__}: {e}") from None
    a = annotations.get(qid)
    if a is not None and a["image_id"] != iid:
      raise _fail(apath, f"question {qid} has image_id {a['image_id']}, the questions file {iid}")
    rows.append({"question_id": qid, "image_id": iid, "image": _join(root, image),
                 "question": text, "answers": list(a["answers"]) if a else [],
                 "answer_type": a.get("answer_type") if a else None,
                 "question_type": a.get("question_type") if a else None})
  return rows


# ------------------------------------------------------------------------------------- pickles
class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only what pickle's own opcodes build; every global lookup is refused."""

  def __init__(self, file: io.BufferedIOBase, path: str):
    # Python 2 pickles (refs(unc).p) hold byte strings; read them as UTF-8 text.
    super().__init__(file, encoding="utf-8")
    self._path = path

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(f"{self._path}: refused global {module}.{name} (only plain "
                            "containers and primitives load)")

  def persistent_load(self, pid: Any):
    raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r:.40}")


def restricted_pickle_load(path: PathLike) -> Any:
  """Loads a pickle of dicts, lists, tuples, sets, str, bytes, numbers, bools and None only.

  Any global the pickle names (a class, or a function such as os.system behind __reduce__) raises
  UnsafePickleError, naming the file and "module.name", before anything is called.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return _RestrictedUnpickler(f, path).load()
  except FileNotFoundError:
    raise MissingFileError(f"{path}: pickle file not found") from None
  except UnsafePickleError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any corrupt pickle)
    raise _fail(path, f"not a readable pickle ({type(e).__name__}: {e})".replace("\n", " ")
                ) from None


# ------------------------------------------------------------------------------------- RefCOCO
def _check_refs(refs: Any, path: str) -> list[dict]:
  """The refs, each with int ref_id/ann_id/image_id, str split and sentences with text."""
  if not isinstance(refs, list):
    raise _fail(path, f"refs are a {_kind(refs)}, expected a list")
  for i, r in enumerate(refs):
    rid = _field(r, "ref_id", int, path, f"refs[{i}]")
    where = f"ref {rid}"
    for key in ("ann_id", "image_id"):
      _field(r, key, int, path, where)
    _field(r, "split", str, path, where)
    for j, s in enumerate(_list_field(r, "sentences", path, where)):
      if not (isinstance(s, dict) and any(isinstance(s.get(k), str) for k in ("sent", "raw"))):
        raise _fail(path, f"sentence {j} of {where} has no string 'sent' or 'raw'")
  return refs


def _read_refs(path: str) -> list[dict]:
  """RefCOCO refs from JSON, or from the public pickle (by extension .p, .pkl, .pickle)."""
  if os.path.splitext(path)[1].lower() in (".p", ".pkl", ".pickle"):
    return _check_refs(restricted_pickle_load(path), path)
  return _check_refs(_read_json(path, "RefCOCO refs file"), path)


def refcoco(refs_path: PathLike, instances_path: PathLike, split: str = "val",
            image_root: PathLike = "") -> list[dict]:
  """RefCOCO / RefCOCO+ / RefCOCOg referring expressions of one split, one row per sentence.

  Args:
    refs_path: refs as JSON (a list of refs) or the public pickle refs(unc).p / refs(google).p /
      refs(umd).p (read by `restricted_pickle_load`).
    instances_path: the dataset's instances.json (COCO format: images, annotations with bbox).
    split: "train", "val", "testA", "testB" (RefCOCO/+), "test" (RefCOCOg umd).
    image_root: folder of the images' file_name (COCO train2014); default instances' folder.
  Returns:
    Rows {"ref_id", "image", "sentence" ("sent", else "raw"), "box" (x0, y0, x1, y1) floats,
    "candidates" (K, 4) float64 x0y0x1y1 of every annotation of the image in file order
    (read-only, shared by the image's rows), "target" (index of the ref's box in candidates)}.
  """
  rpath, ipath = os.fspath(refs_path), os.fspath(instances_path)
  root = os.fspath(image_root) or os.path.dirname(ipath)
  refs = _read_refs(rpath)
  data = _read_json(ipath, "RefCOCO instances file")
  files: dict[int, str] = {}
  for i, im in enumerate(_list_field(data, "images", ipath)):
    files[_field(im, "id", int, ipath, f"images[{i}]")] = _field(
        im, "file_name", str, ipath, f"images[{i}]")
  boxes: dict[int, list[tuple[float, float, float, float]]] = {}
  where_ann: dict[int, tuple[int, int]] = {}     # ann id -> (image id, index among its boxes)
  for i, a in enumerate(_list_field(data, "annotations", ipath)):
    aid = _field(a, "id", int, ipath, f"annotations[{i}]")
    where = f"annotation {aid}"
    iid = _field(a, "image_id", int, ipath, where)
    box = _field(a, "bbox", list, ipath, where)
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in box):
      raise _fail(ipath, f"{where} has bbox {box!r:.60}, expected [x, y, w, h] numbers")
    if aid in where_ann:
      raise _fail(ipath, f"annotation id {aid} appears twice")
    x, y, w, h = (float(v) for v in box)
    where_ann[aid] = (iid, len(boxes.setdefault(iid, [])))
    boxes[iid].append((x, y, x + w, y + h))
  candidates: dict[int, np.ndarray] = {}
  rows = []
  selected = [r for r in refs if r["split"] == split]
  if refs and not selected:
    raise _fail(rpath, f"no ref has split {split!r} (splits: {sorted({r['split'] for r in refs})})")
  for r in selected:
    rid, aid, iid = r["ref_id"], r["ann_id"], r["image_id"]
    if aid not in where_ann:
      raise _fail(rpath, f"ref {rid} has ann_id {aid}, which {ipath} lacks")
    if where_ann[aid][0] != iid:
      raise _fail(rpath, f"ref {rid} has image_id {iid}, its annotation {aid} {where_ann[aid][0]}")
    if iid not in files:
      raise _fail(rpath, f"ref {rid} has image_id {iid}, which {ipath} lacks")
    if iid not in candidates:
      candidates[iid] = np.array(boxes[iid], dtype=np.float64).reshape(-1, 4)
      candidates[iid].flags.writeable = False
    target = where_ann[aid][1]
    for s in r["sentences"]:
      rows.append({"ref_id": rid, "image": _join(root, files[iid]),
                   "sentence": s["sent"] if isinstance(s.get("sent"), str) else s["raw"],
                   "box": boxes[iid][target], "candidates": candidates[iid], "target": target})
  return rows


def refcoco_pickle_to_json(pickle_path: PathLike, json_path: PathLike) -> int:
  """Writes the refs of a public RefCOCO pickle as the JSON list `refcoco` reads; returns the
  number of refs. The file appears whole or not at all (written beside it, then renamed)."""
  src, dst = os.fspath(pickle_path), os.fspath(json_path)
  refs = _check_refs(restricted_pickle_load(src), src)
  try:
    text = json.dumps(refs, ensure_ascii=False)
  except (TypeError, ValueError) as e:
    raise _fail(src, f"refs hold a value JSON cannot carry ({e})") from None
  tmp = f"{dst}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(refs)
