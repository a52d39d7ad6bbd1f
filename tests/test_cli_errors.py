"""One-line errors from the launchers (bigvl.cli): `<script>: <ErrorType>: <message>` on
stderr and exit 1 for what a user can fix, the traceback with --verbose or BIGVL_VERBOSE=1."""

import errno
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from bigvl import cli
from bigvl.train.checkpoint import CheckpointMismatchError
from bigvl.train.lock import WorkdirLocked

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")        # absl's log lines: "I1201 22:36:15.385841 ..."


def _launch(script, *args, env=None):
  p = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=REPO, capture_output=True,
                     text=True, timeout=600, env={**os.environ, **(env or {})})
  return p.returncode, p.stderr


def _one_line(script, *args, **kw) -> str:
  """Runs a launcher that must fail; returns its one line (log lines aside, nothing else)."""
  rc, err = _launch(script, *args, **kw)
  lines = [l for l in err.splitlines() if l.strip() and not LOG_LINE.match(l)]
  assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
  assert lines[0].startswith(f"{script}: "), lines
  return lines[0]


def _mount_tmpfs(path, options):
  os.makedirs(path)
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                     capture_output=True, text=True)
  if p.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
  return str(path)


@pytest.fixture
def small_disk(tmp_path):
  path = _mount_tmpfs(tmp_path / "disk", "size=128k")
  yield path
  subprocess.run(["umount", path], check=True)


@pytest.fixture
def readonly_dir(tmp_path):
  if os.geteuid() != 0:                       # permissions stop everyone but root
    path = tmp_path / "ro"
    path.mkdir(mode=0o555)
    yield str(path)
    path.chmod(0o755)
  else:
    path = _mount_tmpfs(tmp_path / "ro", "ro,size=64k")
    yield path
    subprocess.run(["umount", path], check=True)


# ------------------------------------------------------------------ the launchers


@pytest.mark.parametrize("broken", ["length", "json"])
def test_import_a_broken_safetensors_header(tmp_path, broken):
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    if broken == "length":                      # an 8-byte length far beyond the file
      f.write(b"\xff" * 8 + b'{"a": 1}')
    else:
      f.write((20).to_bytes(8, "little") + b"{not json, garbage!")
  line = _one_line("import_torch.py", f"--ckpt={path}", "--config=configs/m2_tiny.py",
                   f"--out={tmp_path / 'out'}")
  assert line.startswith(
      f"import_torch.py: ValueError: {path}: not a readable .safetensors file"), line
  assert not os.path.exists(tmp_path / "out")


def test_import_a_missing_or_cut_short_checkpoint(tmp_path):
  line = _one_line("import_torch.py", f"--ckpt={tmp_path}/gone.pt", "--config=configs/m2_tiny.py",
                   f"--out={tmp_path / 'out'}")
  assert line == (f"import_torch.py: FileNotFoundError: {tmp_path}/gone.pt: No such file or "
                  "directory: check the path"), line
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "cut.pt")
  torch.save({"w": torch.zeros(4096)}, path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  line = _one_line("import_torch.py", f"--ckpt={path}", "--config=configs/m2_tiny.py",
                   f"--out={tmp_path / 'out'}")
  assert f"ValueError: {path}: not a readable PyTorch checkpoint" in line, line


def test_verbose_shows_the_traceback(tmp_path):
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    f.write(b"\xff" * 16)
  args = [f"--ckpt={path}", "--config=configs/m2_tiny.py", f"--out={tmp_path / 'out'}"]
  for extra, env in (([], {"BIGVL_VERBOSE": "1"}), (["--verbose"], None)):
    rc, err = _launch("import_torch.py", *args, *extra, env=env)
    assert rc == 1 and "Traceback (most recent call last)" in err, err[-3000:]
    assert f"ValueError: {path}: not a readable .safetensors file" in err
    assert "SafetensorError" in err                       # the cause, chained


def test_eval_on_a_missing_workdir(tmp_path):
  line = _one_line("eval.py", "--config=configs/m2_tiny.py", f"--workdir={tmp_path}/nowhere")
  assert line.startswith(f"eval.py: FileNotFoundError: {tmp_path}/nowhere: no such workdir"), line


def test_missing_config_files_and_workdirs_that_are_files_are_one_line(tmp_path):
  (tmp_path / "afile").write_text("")
  line = _one_line("eval.py", "--config=configs/m2_tiny.py", f"--workdir={tmp_path}/afile")
  assert "NotADirectoryError" in line and "the workdir is a file" in line, line
  line = _one_line("train.py", "--config=configs/m2_tiny.py", f"--workdir={tmp_path}/afile")
  assert "cannot create the workdir" in line and "afile" in line, line
  line = _one_line("train.py", "--config=configs/nope.py", f"--workdir={tmp_path}/w")
  assert "configs/nope.py" in line and "No such file" in line, line
  line = _one_line("eval.py", "--config=configs/m2_tiny.py", f"--workdir={tmp_path}",
                   "--config.evals.zeroshot.sourc=world")
  assert "unknown config key 'sourc'" in line and "source" in line, line


def test_export_from_a_workdir_without_checkpoints(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text("{}")
  line = _one_line("export_torch.py", f"--workdir={wd}", f"--out={tmp_path / 'out'}")
  assert line.startswith(f"export_torch.py: FileNotFoundError: {wd} has no checkpoints/"), line
  (wd / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir(parents=True)   # never finished
  line = _one_line("export_torch.py", f"--workdir={wd}", f"--out={tmp_path / 'out'}")
  assert line == (f"export_torch.py: FileNotFoundError: no finished checkpoint in "
                  f"{wd}/checkpoints"), line
  line = _one_line("export_torch.py", f"--workdir={tmp_path}/nowhere", f"--out={tmp_path}/out")
  assert f"{tmp_path}/nowhere: no such directory" in line, line
  assert not os.path.exists(tmp_path / "out")


def _valid_checkpoint(world, path) -> list[str]:
  """A released-layout checkpoint of conftest's small model; the flags that configure it."""
  import torch
  from bigvl.export import name_map
  from test_torch_interop import _cfg, _random_params, _small_flags, _small_sizes
  cfg = _cfg("tiny", **_small_sizes(world), vocab_size=384)
  state = name_map.to_torch(_random_params(cfg), depth=cfg.depth, vl_depth=cfg.vl_depth)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  return ["--config=configs/m2_tiny.py", *_small_flags(world)]


def test_import_and_export_to_a_full_disk(tiny_world, tmp_path, small_disk):
  pytest.importorskip("torch")
  flags = _valid_checkpoint(tiny_world, tmp_path / "m.pt")
  out = os.path.join(small_disk, "out")
  line = _one_line("import_torch.py", f"--ckpt={tmp_path / 'm.pt'}", f"--out={out}", *flags)
  assert re.fullmatch(
      rf"import_torch.py: DiskFullError: disk full at {out}: 1\d\d\.\d KiB free, the import "
      r"needs about \d+\.\d KiB: free some space or choose another directory, then rerun",
      line), line
  assert os.listdir(small_disk) == []                 # the half-written import is removed
  imported = str(tmp_path / "imported")
  rc, err = _launch("import_torch.py", f"--ckpt={tmp_path / 'm.pt'}", f"--out={imported}", *flags)
  assert rc == 0, err[-3000:]
  line = _one_line("export_torch.py", f"--workdir={imported}", f"--out={out}")
  assert re.fullmatch(  # safetensors says it in words only: "I/O error: ... (os error 28)"
      rf"export_torch.py: DiskFullError: disk full at {out}: [\d.]+ KiB free, the export needs "
      r"about \d+\.\d KiB: free some space or choose another directory, then rerun", line), line
  assert os.listdir(out) == []                        # no half-written model.safetensors


def test_import_and_export_to_a_read_only_directory(tiny_world, tmp_path, readonly_dir):
  pytest.importorskip("torch")
  flags = _valid_checkpoint(tiny_world, tmp_path / "m.pt")
  out = os.path.join(readonly_dir, "out")
  line = _one_line("import_torch.py", f"--ckpt={tmp_path / 'm.pt'}", f"--out={out}", *flags)
  assert line.startswith(f"import_torch.py: ") and f"{readonly_dir}: " in line, line
  assert "(--out): choose another path" in line or "(--out): check its permissions" in line, line
  imported = str(tmp_path / "imported")
  rc, err = _launch("import_torch.py", f"--ckpt={tmp_path / 'm.pt'}", f"--out={imported}", *flags)
  assert rc == 0, err[-3000:]
  line = _one_line("export_torch.py", f"--workdir={imported}", f"--out={out}")
  assert f"{readonly_dir}: " in line and "(--out)" in line, line


# ------------------------------------------------------------------ the messages


def _raised(exc, cause=None):
  """`exc` as raised (from `cause`), with its traceback and chain."""
  try:
    if cause is None:
      raise exc
    try:
      raise cause
    except BaseException as c:
      raise exc from c
  except BaseException as e:
    return e


def test_error_lines():
  line = lambda e, **kw: cli.error_line(_raised(e), "x.py", **kw)
  assert line(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/run")) == (
      "x.py: PermissionError: /data/run: Permission denied: check its permissions or choose "
      "another path")
  assert line(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run")) == (
      "x.py: OSError: /ro/run: Read-only file system: choose another path")
  mismatch = CheckpointMismatchError("run step 10: 'w' has shape (2,)\n  the model wants (3,)")
  assert line(mismatch) == (
      "x.py: CheckpointMismatchError: run step 10: 'w' has shape (2,); the model wants (3,)")
  assert line(OSError(errno.EACCES, "the workdir /w is read-only: make it writable")) == (
      "x.py: PermissionError: the workdir /w is read-only: make it writable")   # no "[Errno 13]"
  assert line(KeyboardInterrupt()) == "x.py: KeyboardInterrupt: interrupted (Ctrl-C or SIGINT)"
  assert line(WorkdirLocked("run is in use by pid 7")) == (
      "x.py: WorkdirLocked: run is in use by pid 7")
  assert line(ValueError()) == "x.py: ValueError: (no message)"
  # A bug keeps its traceback, unless the launcher expects it or it was raised from a known cause.
  assert line(RuntimeError("boom")) is None and line(AssertionError()) is None
  assert line(RuntimeError("boom"), expected=(RuntimeError,)) == "x.py: RuntimeError: boom"
  assert cli.error_line(_raised(RuntimeError("wrapped"), FileNotFoundError(
      errno.ENOENT, os.strerror(errno.ENOENT), "/x/config.json")), "x.py") == (
          "x.py: FileNotFoundError: /x/config.json: No such file or directory: check the path")


def test_a_full_disk_is_found_wherever_it_is_in_the_chain(tmp_path):
  free = cli.free_bytes(str(tmp_path))
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "a" / "b"))
  # Orbax re-raises what TensorStore said as a ValueError; its threads as a RuntimeError.
  nested = _raised(RuntimeError("commit failed"), _raised(ValueError(
      "RESOURCE_EXHAUSTED: Failed to write 16100 bytes: No space left on device [os_error=28]"),
      full))
  line = cli.error_line(nested, "x.py")
  assert line.startswith(f"x.py: OSError: disk full at {tmp_path / 'a' / 'b'}: "), line
  assert line.endswith(" free: free some space or choose another directory, then rerun"), line
  text_only = cli.error_line(_raised(RuntimeError("I/O error: No space left on device (os error "
                                                  "28)")), "x.py")
  assert text_only == ("x.py: RuntimeError: disk full: no space left on device: free some space "
                       "or choose another directory, then rerun")
  quoted = cli.error_line(_raised(ValueError(f'Failed writing: "{tmp_path}/d/91": No space left on '
                                             "device")), "x.py")
  assert quoted.startswith(f"x.py: ValueError: disk full at {tmp_path}/d/91: "), quoted

  with pytest.raises(cli.DiskFullError) as e:
    with cli.needs_space(str(tmp_path / "ckpt"), 3 * 2**30):
      raise nested
  assert e.value.errno == errno.ENOSPC and e.value.__cause__ is nested
  line = cli.error_line(_raised(RuntimeError("save failed"), e.value), "x.py")
  assert re.fullmatch(rf"x.py: DiskFullError: disk full at {tmp_path / 'ckpt'}: [\d.]+ \w?i?B "
                      r"free, the checkpoint needs about 3\.0 GiB: free some space or choose "
                      r"another directory, then rerun", line), line
  assert abs(cli.free_bytes(str(tmp_path / "not" / "yet")) - free) < 2**30
  with pytest.raises(KeyError):                         # anything else passes through
    with cli.needs_space(str(tmp_path), 1):
      raise KeyError("x")


def test_check_writable(tmp_path):
  cli.check_writable(str(tmp_path / "new" / "dir"))     # created later: its parent is checked
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    cli.check_writable(str(tmp_path / "file" / "out"), "--out")
  cli.check_writable("gs://bucket/out")                 # not checked
