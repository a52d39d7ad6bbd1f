"""Data for evaluation, read without TensorFlow: the embedded world's splits, TFDS-prepared datasets
(through `tfds.data_source`, i.e. their ArrayRecord files), JSON-lines files in the format of the
reference M²-Encoder evaluation and COCO captions files.

`open_entry` reads the source of one `config.evals` entry. Every source gives an `EvalSet`: images
as lazily read `common.Rows` (each process reads only its own block), and what is small enough for
every process to hold: labels, class names, captions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from bigvl.data.formats import image_text
from bigvl.evaluators import common, kinds

_HAN = re.compile(r"[\u3400-\u9fff]")


@dataclasses.dataclass
class EvalSet:
  images: common.Rows                      # {"image": float32 (k, s, s, 3)[, "label": int]}
  labels: np.ndarray | None = None         # class per image, when every process can know it cheaply
  label_names: list[str] | None = None     # the source's class names (TFDS ClassLabel), English
  captions: list[list[tuple[str, str]]] | None = None   # per image: (language, caption) pairs

  def __len__(self) -> int:
    return len(self.images)


def guess_lang(text: str) -> str:
  """"zh" for text with Han characters, else "en" (the two languages M²-Encoder is trained on)."""
  return "zh" if _HAN.search(text) else "en"


# Encoded image → uint8 (size, size, 3), full decode (no draft); the model normalises it on the
# device as the reference inference transform does.
preprocess = image_text.eval_pixels


class BadEvalImageError(ValueError):
  """An evaluation image that cannot be decoded; the message names it."""


def _decode(data: bytes, image_size: int, name: Callable[[], str]) -> np.ndarray:
  try:
    return preprocess(data, image_size)
  except Exception as e:  # PIL raises many types
    raise BadEvalImageError(f"{name()}: undecodable image ({type(e).__name__}: {e})") from None


def _image_rows(n: int, read: Callable[[np.ndarray], list[bytes]], image_size: int,
                name: Callable[[int], str] = lambda i: f"row {i}") -> common.Rows:
  def load(idx):
    return {"image": np.stack([_decode(b, image_size, lambda i=i: name(int(i)))
                               for i, b in zip(idx, read(idx))])}
  return common.Rows(n, load)


def _file_reader(paths: Sequence[str]) -> Callable[[np.ndarray], list[bytes]]:
  """indices → the bytes of those files (what `_image_rows` reads images with)."""
  def read(idx):
    out = []
    for i in idx:
      with open(paths[i], "rb") as f:
        out.append(f.read())
    return out
  return read


def split_or(entry, default: str) -> str:
  """The entry's split, or the source's own evaluation split where the entry keeps the common
  default ("eval_heldout", the image world's): "eval" for the scene world, "test" for VOC2007."""
  s = entry.get("split", "")
  return default if s in ("", "eval_heldout") else s


def check_image_file(path: str, where: str) -> None:
  """Reads `path`'s header (cheap: no full decode) and raises BadEvalImageError naming `where`
  when it is not an image PIL can read: a run fails when it starts, not at its final evaluation."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      img.verify()
  except Exception as e:  # PIL raises many types
    raise BadEvalImageError(f"{where}: image {path} is not readable ({type(e).__name__}: "
                            f"{e})") from None


def open_entry(name: str, entry, *, image_size: int, world_dir: str = "", label_key: str = "",
               caption_key: str = "") -> EvalSet:
  """The data of eval entry `name`: its source, split, data_dir and max_examples. For the world,
  `labels` are the world's class indices; for TFDS, `label_key` / `caption_key` name the features
  to read ("": none)."""
  try:
    where_kind, where = kinds.parse_source(entry.get("source", "world"))
  except ValueError as e:
    raise ValueError(f"evals.{name}: {e}") from None
  limit = entry.get("max_examples", 0)
  if where_kind == "world":
    if not world_dir:
      raise ValueError(f"evals.{name}: source 'world' needs data.kind='synthetic_world'")
    data, metas = world(world_dir, entry.get("split", "eval_heldout"), image_size, limit)
    data.labels = np.array([m["class"] for m in metas])
    return data
  if where_kind == "jsonl":
    return jsonl(where, image_size, entry.get("data_dir", ""), limit)
  if where_kind == "coco":
    return coco_captions(where, image_size, entry.get("data_dir", ""), limit)
  return tfds_source(where, entry.get("split", "eval_heldout"), image_size,
                     data_dir=entry.get("data_dir", ""), image_key=entry.get("image_key", "image"),
                     label_key=label_key, caption_key=caption_key, max_examples=limit)


# ---------------------------------------------------------------------------- the embedded world
WORLD_META = "world.json"


def world_meta(data_dir: str) -> dict[str, Any]:
  """The world's metadata file, as its builder wrote it: "classes" (one per class index),
  "zeroshot_names" ({lang: [the name, or its forms, of each class]}) and "zeroshot_templates"
  ({lang: [...]}) among others."""
  path = os.path.join(data_dir, WORLD_META)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {WORLD_META} in {data_dir}: not an embedded world")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  missing = [k for k in ("classes", "zeroshot_names", "zeroshot_templates") if k not in meta]
  if missing:
    raise ValueError(f"{path} has no {missing}: a world built by older code; rebuild it (delete "
                     f"{data_dir})")
  return meta


def split_records(data_dir: str, split: str, image_size: int, max_examples: int = 0
                  ) -> tuple[common.Rows, list[dict[str, Any]]]:
  """A split of a world written as shards (`{split}-*.array_record`): its pictures as rows and
  each record's metadata."""
  files = sorted(glob.glob(os.path.join(data_dir, f"{split}-*.array_record")))
  if not files:
    raise FileNotFoundError(f"no shards for split {split!r} in {data_dir}")
  records = image_text.load_examples(files)
  if max_examples:
    records = records[:max_examples]
  rows = _image_rows(len(records), lambda idx: [records[i]["image"] for i in idx], image_size)
  return rows, [r["meta"] for r in records]


def world(data_dir: str, split: str, image_size: int, max_examples: int = 0) -> tuple[EvalSet, list]:
  """A split of the embedded synthetic world; also returns its records' metadata (classes)."""
  rows, metas = split_records(data_dir, split, image_size, max_examples)
  captions = [[(lang, m["captions"][lang]) for lang in sorted(m["captions"])] for m in metas]
  return EvalSet(rows, captions=captions), metas


# ---------------------------------------------------------------------------- JSON-lines
def jsonl(path: str, image_size: int, image_root: str = "", max_examples: int = 0) -> EvalSet:
  """The reference evaluation format: one `{"image": path, "caption": [captions]}` per line.

  Also accepted: "captions" for "caption", a single caption string, "lang" (else each caption's
  language is guessed: Han characters → zh), and an integer "label" on every line (zero-shot from a
  JSON-lines file). Image paths are relative to `image_root` (default: the file's folder). A line
  whose image was already seen adds its captions to that image: one image is one retrieval target.
  """
  root = image_root or os.path.dirname(os.path.abspath(path))
  order: list[str] = []
  captions: dict[str, list[tuple[str, str]]] = {}
  labels: dict[str, int] = {}
  first_line: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
      image = obj.get("image") if isinstance(obj, dict) else None
      if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: needs an \"image\" path")
      caps = obj.get("caption", obj.get("captions", []))
      caps = [caps] if isinstance(caps, str) else caps
      if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{where}: \"caption\" must be a string or a list of strings")
      lang = obj.get("lang")
      image = image if os.path.isabs(image) else os.path.join(root, image)
      if image not in captions:
        if max_examples and len(order) == max_examples:
          break
        order.append(image)
        first_line[image] = line_no
        captions[image] = []
      # As written (the reference neither strips nor drops them); only blank ones are left out.
      captions[image] += [(lang or guess_lang(c), c) for c in caps if c.strip()]
      if "label" in obj:
        labels[image] = int(obj["label"])
  if not order:
    raise ValueError(f"{path}: no images")
  missing = [p for p in order if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{path}:{first_line[missing[0]]}: {len(missing)} image(s) not found, "
                            f"e.g. {missing[0]} (paths are relative to {root}; set the eval's "
                            "data_dir to the image root)")
  for p in order:
    check_image_file(p, f"{path}:{first_line[p]}")
  uncaptioned = [p for p in order if not captions[p]]
  if uncaptioned and not labels:
    raise ValueError(f"{path}:{first_line[uncaptioned[0]]}: image {uncaptioned[0]} has no "
                     f"caption ({len(uncaptioned)} such)")
  label_array = None
  if labels:
    if len(labels) != len(order):
      raise ValueError(f"{path}: \"label\" is on {len(labels)} of {len(order)} images: all or none")
    label_array = np.array([labels[p] for p in order])

  return EvalSet(_image_rows(len(order), _file_reader(order), image_size,
                             lambda i: f"{path}:{first_line[order[i]]}: image {order[i]}"),
                 labels=label_array,
                 captions=[captions[p] for p in order])


# ---------------------------------------------------------------------------- COCO captions
def coco_captions(path: str, image_size: int, image_root: str = "",
                  max_examples: int = 0) -> EvalSet:
  """A COCO captions file (`captions_val2017.json`; COCO-CN's Chinese ones have the same layout):
  {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption"}, ...]}.

  Images in the order of "images", each with all its captions (language guessed: Han characters →
  zh), as written; blank ones are left out. File names are relative to `image_root` (default: the
  file's folder); where the first image is not there, `<root>/<split>/` is tried too, `<split>`
  named by the file ("val2017"; with no `image_root`, also beside the file's folder: COCO's
  annotations/ and val2017/ side by side).
  """
  with open(path, encoding="utf-8") as f:
    try:
      doc = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
  if (not isinstance(doc, dict) or not isinstance(doc.get("images"), list)
      or not isinstance(doc.get("annotations"), list)):
    raise ValueError(f"{path}: needs \"images\" and \"annotations\" lists (a COCO captions file)")
  ids, files = [], []
  for i, img in enumerate(doc["images"]):
    if (not isinstance(img, dict) or not isinstance(img.get("id"), (int, str))
        or not isinstance(img.get("file_name"), str) or not img["file_name"]):
      raise ValueError(f"{path}: images[{i}] needs an \"id\" and a \"file_name\"")
    ids.append(img["id"])
    files.append(img["file_name"])
  row = {}
  for i, image_id in enumerate(ids):
    if row.setdefault(image_id, i) != i:
      raise ValueError(f"{path}: images[{i}]: id {image_id!r} is also images[{row[image_id]}]")
  captions: list[list[tuple[str, str]]] = [[] for _ in ids]
  for j, ann in enumerate(doc["annotations"]):
    if (not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (int, str))
        or not isinstance(ann.get("caption"), str)):
      raise ValueError(f"{path}: annotations[{j}] needs an \"image_id\" and a \"caption\" string")
    if ann["image_id"] not in row:
      raise ValueError(f"{path}: annotations[{j}]: image_id {ann['image_id']!r} is not in "
                       "\"images\"")
    if ann["caption"].strip():
      captions[row[ann["image_id"]]].append((guess_lang(ann["caption"]), ann["caption"]))
  if max_examples:
    ids, files, captions = ids[:max_examples], files[:max_examples], captions[:max_examples]
  if not ids:
    raise ValueError(f"{path}: no images")
  uncaptioned = [i for i, c in enumerate(captions) if not c]
  if uncaptioned:
    i = uncaptioned[0]
    raise ValueError(f"{path}: image {ids[i]!r} ({files[i]}) has no caption ({len(uncaptioned)} "
                     "such)")

  here = os.path.dirname(os.path.abspath(path))
  root = image_root or here
  split = re.fullmatch(r"captions_(.+)\.json", os.path.basename(path))
  if split:
    # data_dir the COCO folder, or unset with the file in annotations/: where COCO unpacks to.
    also = [os.path.join(root, split[1])]
    also += [] if image_root else [os.path.join(os.path.dirname(here), split[1])]
    root = next((r for r in [root] + also if os.path.isfile(os.path.join(r, files[0]))), root)
  paths = [os.path.join(root, f) for f in files]
  missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{path}: {len(missing)} image(s) not found, e.g. image "
                            f"{ids[missing[0]]!r} at {paths[missing[0]]} (file names are relative "
                            f"to {root}; set the eval's data_dir to the image folder)")
  for image_id, p in zip(ids, paths):
    check_image_file(p, f"{path}: image {image_id!r}")

  return EvalSet(_image_rows(len(paths), _file_reader(paths), image_size,
                             lambda i: f"{path}: image {ids[i]!r} ({paths[i]})"),
                 captions=captions)


# ---------------------------------------------------------------------------- TFDS
def _feature(example: dict[str, Any], key: str) -> Any:
  for part in key.split("/"):
    example = example[part]
  return example


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_source(name: str, split: str, image_size: int, *, data_dir: str = "",
                image_key: str = "image", label_key: str = "", caption_key: str = "",
                max_examples: int = 0) -> EvalSet:
  """A TFDS-prepared dataset read through `tfds.data_source` (no TensorFlow).

  The dataset must have been prepared in the ArrayRecord file format (`tfds build
  --file_format=array_record`, or `tfds convert_format` of an existing TFRecord preparation).
  `label_key` names a ClassLabel feature (zero-shot: labels travel with each process's images and
  the class names come from the feature); `caption_key` a text feature or a sequence of them, a
  nested one written "captions/text" (retrieval: every process reads every caption).
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS evaluation sources need tensorflow-datasets (pip install "
                      "'bigvl[tfds]'); TensorFlow itself is not needed") from e
  ds = tfds.data_source(name, split=split, data_dir=data_dir or None,
                        decoders={image_key: tfds.decode.SkipDecoding()})
  n = len(ds) if not max_examples else min(len(ds), max_examples)
  features = ds.dataset_info.features

  def read(idx: np.ndarray) -> list[dict[str, Any]]:
    return ds.__getitems__([int(i) for i in idx])

  def load(idx: np.ndarray) -> dict[str, np.ndarray]:
    examples = read(idx)
    out = {"image": np.stack([
        _decode(_feature(e, image_key), image_size, lambda i=i: f"tfds:{name} {split} example {i}")
        for i, e in zip(idx, examples)])}
    if label_key:
      out["label"] = np.array([int(_feature(e, label_key)) for e in examples])
    return out

  label_names = None
  if label_key:
    label_names = [s.replace("_", " ") for s in features[label_key].names]
  captions = None
  if caption_key:
    captions = []
    for start in range(0, n, 256):
      for e in read(np.arange(start, min(n, start + 256))):
        value = _feature(e, caption_key)
        texts = [value] if isinstance(value, (str, bytes)) else list(value)
        captions.append([(guess_lang(_text(t)), _text(t)) for t in texts if _text(t).strip()])
  return EvalSet(common.Rows(n, load), label_names=label_names, captions=captions)


def split_langs(captions: Sequence[Sequence[tuple[str, str]]]
                ) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
  """Per-image (lang, caption) pairs → texts per language and each text's image index."""
  texts: dict[str, list[str]] = {}
  owner: dict[str, list[int]] = {}
  for i, caps in enumerate(captions):
    for lang, c in caps:
      texts.setdefault(lang, []).append(c)
      owner.setdefault(lang, []).append(i)
  return texts, owner


# ---------------------------------------------------------------------------- the scene world
SCENES_META = "scenes.json"


def scenes_meta(scene_dir: str) -> dict[str, Any]:
  """The scene world's metadata file: "labels" ({"en", "zh"} per class), "answers",
  "type_answers", "held_out" (data_pipelines/scene_world.describe)."""
  path = os.path.join(scene_dir, SCENES_META)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {SCENES_META} in {scene_dir}: not a scene world (the systems on "
                            "scenes build it in prepare)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def scenes(scene_dir: str, split: str, image_size: int, max_examples: int = 0
           ) -> tuple[EvalSet, list[dict[str, Any]]]:
  """A split of the scene world: its pictures and each record's metadata (objects with boxes,
  labels, questions, referring expression, captions)."""
  rows, metas = split_records(scene_dir, split, image_size, max_examples)
  return EvalSet(rows), metas


def image_files(paths: Sequence[str], image_size: int, where: str) -> common.Rows:
  """Rows of the images at `paths`, decoded when read; every file is checked now (present and
  readable), so a broken set fails when the run starts."""
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{where}: {len(missing)} image(s) not found, e.g. {missing[0]} (set "
                            "the eval's data_dir to the image root)")
  for p in paths:
    check_image_file(p, where)

  return _image_rows(len(paths), _file_reader(paths), image_size,
                     lambda i: f"{where}: image {paths[i]}")
