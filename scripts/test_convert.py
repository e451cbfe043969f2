"""Tests of scripts/convert_chatpose.py: a conversion writes a whole bundle or none.

The staging tests need only the standard library; the converter tests run the real converter
(llama.cpp's converter, torch's exporter) on the tiny checkpoint that make_tiny_chatpose.py
writes, and need scripts/requirements-convert.txt. tests/convert.rs runs this file from
`cargo test` with the Python that `scripts/setup.sh --tests` installs:

    .venv-convert/bin/python -m unittest -v scripts/test_convert.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from bundle_staging import Staging, StagingError  # noqa: E402

BUNDLE_FILES = {"llm.gguf", "vision.onnx", "pose_head.onnx", "posegpt.toml"}


def leftovers(*folders: Path) -> list[str]:
    """Hidden staging, work or old folders of a conversion."""
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir()
                  if p.name.startswith(".") and any(k in p.name for k in
                                                    (".partial-", ".work-", ".old-")))


class StagingTests(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="staging-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.out = self.tmp / "bundle"

    def test_a_failure_inside_leaves_neither_out_nor_temporary_folders(self):
        with self.assertRaises(RuntimeError):
            with Staging(self.out) as s:
                (s.partial / "llm.gguf").write_bytes(b"x" * 100)
                (s.work / "model.safetensors").write_bytes(b"y" * 100)
                raise RuntimeError("a step failed late")
        self.assertFalse(self.out.exists())
        self.assertEqual(leftovers(self.tmp), [])

    def test_commit_makes_out_and_removes_the_work_folder(self):
        with Staging(self.out) as s:
            (s.partial / "posegpt.toml").write_text("name = 'x'\n")
            (s.work / "copy").write_bytes(b"y")
            s.commit()
        self.assertEqual(sorted(p.name for p in self.out.iterdir()), ["posegpt.toml"])
        self.assertEqual(leftovers(self.tmp), [])

    def test_an_existing_out_is_kept_unless_overwrite_and_replaced_only_on_commit(self):
        self.out.mkdir()
        (self.out / "old-file").write_text("old")
        with self.assertRaises(StagingError) as e:
            Staging(self.out)
        self.assertIn(str(self.out), str(e.exception))
        self.assertIn("--overwrite", str(e.exception))
        with self.assertRaises(RuntimeError):
            with Staging(self.out, overwrite=True) as s:
                (s.partial / "new-file").write_text("new")
                raise RuntimeError("failed")
        self.assertEqual([p.name for p in self.out.iterdir()], ["old-file"])
        with Staging(self.out, overwrite=True) as s:
            (s.partial / "new-file").write_text("new")
            s.commit()
        self.assertEqual([p.name for p in self.out.iterdir()], ["new-file"])
        self.assertEqual(leftovers(self.tmp), [])

    def test_the_work_folder_goes_where_asked(self):
        work = self.tmp / "scratch"
        work.mkdir()
        with Staging(self.out, work_dir=work) as s:
            self.assertEqual(s.work.parent, work)
            self.assertEqual(s.partial.parent, self.tmp)
            s.commit()
        self.assertEqual(leftovers(self.tmp, work), [])

    def test_what_a_killed_run_left_is_removed_and_a_running_ones_is_not(self):
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = [self.tmp / f".bundle.partial-{dead.pid}", self.tmp / f".bundle.work-{dead.pid}"]
        live = self.tmp / f".bundle.partial-{os.getppid()}"
        other = self.tmp / f".other.partial-{dead.pid}"
        for p in stale + [live, other]:
            p.mkdir()
        with Staging(self.out) as s:
            removed = s.remove_stale()
        self.assertEqual(sorted(removed), sorted(stale))
        self.assertTrue(live.exists() and other.exists())

    def test_too_little_space_names_the_folder_the_amounts_and_what_to_do(self):
        free = shutil.disk_usage(self.tmp).free
        with Staging(self.out) as s:
            with self.assertRaises(StagingError) as e:
                s.require_space([(s.work.parent, free, "the LLM-only copy"),
                                 (s.partial.parent, 10 << 20, "llm.gguf")])
            s.require_space([(s.partial.parent, 10 << 20, "llm.gguf")])
        text = str(e.exception)
        for part in (str(self.tmp), "the LLM-only copy", "llm.gguf", "is free", "--work-dir"):
            self.assertIn(part, text)

    def test_sigterm_stops_the_run_and_cleans_up(self):
        script = (f"import sys, time; sys.path.insert(0, {str(SCRIPTS)!r})\n"
                  "from bundle_staging import Staging\n"
                  f"with Staging({str(self.out)!r}) as s:\n"
                  "    (s.partial / 'llm.gguf').write_bytes(b'x')\n"
                  "    print('ready', flush=True)\n"
                  "    time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.assertEqual(proc.stdout.readline().strip(), "ready")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("stopped by SIGTERM", err)
        self.assertFalse(self.out.exists())
        self.assertEqual(leftovers(self.tmp), [])


def have_converter_packages() -> bool:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class ConverterTests(unittest.TestCase):
    """The real converter on the tiny released-layout checkpoint."""

    @classmethod
    def setUpClass(cls):
        if not have_converter_packages():
            raise unittest.SkipTest("needs scripts/requirements-convert.txt (scripts/setup.sh "
                                    "--tests installs it into .venv-convert)")
        cls.tmp = Path(tempfile.mkdtemp(prefix="convert-test-"))
        src = cls.tmp / "src"
        subprocess.run([sys.executable, str(SCRIPTS / "make_tiny_chatpose.py"), "--out",
                        str(src), "--fixtures", str(src / "fixtures")], check=True,
                       capture_output=True)
        cls.checkpoint, cls.clip = src / "chatpose-tiny", src / "clip"

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(dir=self.tmp))
        self.out = self.dir / "test-chatpose-tiny"

    def convert(self, checkpoint=None, clip=None, *extra):
        return subprocess.run(self.command(checkpoint, clip, *extra), capture_output=True,
                              text=True, timeout=600)

    def command(self, checkpoint=None, clip=None, *extra):
        return [sys.executable, str(SCRIPTS / "convert_chatpose.py"),
                str(checkpoint or self.checkpoint), "--clip", str(clip or self.clip),
                str(self.out), "--outtype", "f32", "--split-linear-bytes", "6000", *extra]

    def test_the_conversion_is_the_committed_bundle_with_the_checkpoint_name(self):
        done = self.convert()
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual({p.name for p in self.out.iterdir()}, BUNDLE_FILES)
        self.assertEqual(leftovers(self.dir), [])
        # Same bytes as models/test-chatpose-tiny, whose outputs tests/chatpose.rs compares
        # with PyTorch's: what is committed is what the converter makes today.
        for name in sorted(BUNDLE_FILES):
            self.assertEqual((self.out / name).read_bytes(),
                             (ROOT / "models/test-chatpose-tiny" / name).read_bytes(), name)
        self.assertEqual(gguf_name(self.out / "llm.gguf"), "chatpose-tiny")

    def test_pytorch_bin_shards_convert_to_the_same_bundle(self):
        # The release comes as pytorch_model-0000N-of-00003.bin, read memory-mapped.
        import torch
        from make_tiny_chatpose import save_shards
        from safetensors.torch import load_file

        shards = self.dir / "chatpose-tiny"
        shutil.copytree(self.checkpoint, shards, ignore=shutil.ignore_patterns("*.safetensors"))
        save_shards(load_file(str(self.checkpoint / "model.safetensors")), shards, 3,
                    torch.float32)
        self.assertEqual(len(list(shards.glob("pytorch_model-*.bin"))), 3)
        done = self.convert(shards)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        for name in sorted(BUNDLE_FILES):
            self.assertEqual((self.out / name).read_bytes(),
                             (ROOT / "models/test-chatpose-tiny" / name).read_bytes(), name)

    def test_a_missing_pose_head_is_named_and_leaves_no_bundle(self):
        from safetensors.torch import load_file, save_file

        broken = self.dir / "no-head"
        shutil.copytree(self.checkpoint, broken)
        state = load_file(str(broken / "model.safetensors"))
        save_file({k: v for k, v in state.items() if "text_hidden_fcs" not in k},
                  str(broken / "model.safetensors"))
        done = self.convert(broken)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("model.text_hidden_fcs.0.0.weight", done.stderr)
        self.assertIn("pose head", done.stderr)
        self.assertFalse(self.out.exists())
        self.assertEqual(leftovers(self.dir), [])

    def test_a_tower_that_fails_after_llm_gguf_leaves_no_bundle(self):
        clip = self.dir / "clip"
        shutil.copytree(self.clip, clip)
        weights = clip / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        done = self.convert(None, clip)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("[4/6]", done.stdout)  # llm.gguf had been written
        self.assertIn(str(clip), done.stderr)
        self.assertFalse(self.out.exists())
        self.assertEqual(leftovers(self.dir), [])

    def test_a_killed_run_leaves_no_bundle_and_the_next_run_clears_its_folders(self):
        with subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("[4/6]"):
                    break
            proc.kill()  # SIGKILL: no cleanup of its own
        self.assertFalse(self.out.exists())
        left = leftovers(self.dir)
        self.assertIn(f".{self.out.name}.partial-{proc.pid}", left)
        done = self.convert()
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn(f"removed {self.dir / f'.{self.out.name}.partial-{proc.pid}'}", done.stdout)
        self.assertEqual(leftovers(self.dir), [])
        self.assertEqual({p.name for p in self.out.iterdir()}, BUNDLE_FILES)

    def test_sigterm_during_llama_cpp_stops_both_processes_and_cleans_up(self):
        proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        for line in proc.stdout:
            if line.startswith("[3/6]"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("stopped by SIGTERM", err)
        self.assertFalse(self.out.exists())
        self.assertEqual(leftovers(self.dir), [])
        time.sleep(0.5)
        self.assertEqual(children_running("convert_hf_to_gguf.py", str(self.dir)), [])

    def test_an_existing_output_is_not_touched_without_overwrite(self):
        self.out.mkdir()
        (self.out / "mine.txt").write_text("keep")
        done = self.convert()
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("--overwrite", done.stderr)
        self.assertEqual([p.name for p in self.out.iterdir()], ["mine.txt"])


def gguf_name(path: Path) -> str:
    """general.name of a GGUF file, read with the gguf-py that the converter downloaded."""
    from convert_chatpose import llama_cpp_converter

    sys.path.insert(0, str(llama_cpp_converter().parent / "gguf-py"))
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.name"]
    return bytes(field.parts[field.data[0]]).decode()


def children_running(*words: str) -> list[str]:
    """Command lines of running processes that contain every one of `words`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(w in cmd for w in words):
            found.append(cmd)
    return found


if __name__ == "__main__":
    unittest.main()
