"""Saving: only an earlier kiln artifact is replaced; concurrent saves take turns; a killed save is repaired."""
import json
import signal
import subprocess
import sys
import textwrap

import pytest

import kiln
from kiln.errors import ArtifactError
from kiln.runtime import read_artifact


def _siblings(path):
    """Everything beside ``path`` that a save made: temporary, replaced and lock files."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_a_directory_with_some_other_manifest_json_is_not_replaced(compiled, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    (site / "index.html").write_text("<html>")
    with pytest.raises(ArtifactError, match=f"refusing to overwrite {site}: it exists and is not a kiln artifact"):
        compiled[2].save(site)
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]
    assert _siblings(site) == []


def test_an_artifact_holding_files_it_does_not_list_is_not_replaced(compiled, saved):
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"it is a kiln artifact, but it also holds files it does not list "
                                            r"\(notes.txt\)"):
        compiled[2].save(saved)
    assert (saved / "notes.txt").read_text() == "mine"
    kiln.load(saved)


def test_a_symlink_is_not_replaced(compiled, saved, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(saved)
    with pytest.raises(ArtifactError, match="it is a symbolic link"):
        compiled[2].save(link)
    assert link.is_symlink()


# A child process that saves SOURCE over TARGET and SIGKILLs itself at one point of the save.
_KILLED_SAVE = """
import os, shutil, signal, sys
from pathlib import Path
from kiln.runtime import artifact
source, target, point = sys.argv[1:4]
art = artifact.read_artifact(source)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_rename, real_rmtree, real_write = os.rename, shutil.rmtree, Path.write_bytes
if point == "writing":  # the temporary copy half-written
    Path.write_bytes = lambda self, data: (real_write(self, data[: len(data) // 2]), die())
elif point == "swapping":  # the old artifact moved aside, the new one not yet in place
    os.rename = lambda src, dst: (real_rename(src, dst), str(dst).endswith("/a") and die())
elif point == "cleaning":  # the new artifact in place, the old one half-deleted
    shutil.rmtree = lambda p, **k: (os.unlink(Path(p) / "a" / "manifest.json"), die())
artifact.write_artifact(art, target)
"""


@pytest.mark.parametrize("point", ["writing", "swapping", "cleaning"])
@pytest.mark.parametrize("repair", ["load", "save"])
def test_a_save_killed_half_way_leaves_nothing_stranded(compiled, torch_saved, tmp_path, point, repair):
    target = compiled[2].save(tmp_path / "target")  # the old artifact: cpu; the killed save writes the torch one
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(torch_saved), str(target), point])
    assert child.returncode == -signal.SIGKILL
    assert _siblings(target)  # it did leave something
    if repair == "load":
        got = read_artifact(target).manifest["target"]
        assert got == ("torch" if point == "cleaning" else "cpu")  # the old artifact, unless the new one was in place
    else:
        compiled[2].save(target)
        assert read_artifact(target).manifest["target"] == "cpu"
    assert _siblings(target) == []


def test_random_kills_during_saves_never_lose_the_artifact(compiled, torch_saved, tmp_path):
    target = compiled[2].save(tmp_path / "target")
    loop = f"""
        from kiln.runtime import artifact
        a, b = artifact.read_artifact({str(torch_saved)!r}), artifact.read_artifact({str(target)!r})
        print("ready", flush=True)
        while True:
            artifact.write_artifact(a, {str(target)!r})
            artifact.write_artifact(b, {str(target)!r})
    """
    import random
    import time

    rng = random.Random(0)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(loop)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert read_artifact(target).manifest["target"] in ("cpu", "torch")
        assert _siblings(target) == []


def test_concurrent_saves_of_one_path_take_turns(compiled, torch_saved, tmp_path):
    """Two writers x 20 saves and a reader: every save and every load succeeds; the last writer wins."""
    target = compiled[2].save(tmp_path / "target")
    writer = """
        import sys
        from kiln.runtime import artifact
        art = artifact.read_artifact(sys.argv[1])
        for _ in range(20):
            artifact.write_artifact(art, sys.argv[2])
    """
    reader = """
        import sys, time
        from kiln.runtime import artifact
        end = time.time() + 3
        n = 0
        while time.time() < end:
            artifact.read_artifact(sys.argv[1])
            n += 1
        print(n)
    """
    sources = [str(torch_saved), str(tmp_path / "cpu_source")]
    compiled[2].save(sources[1])
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), s, str(target)], stderr=subprocess.PIPE,
                              text=True) for s in sources]
    procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(reader), str(target)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    assert int(results[2][0]) > 0
    assert read_artifact(target).manifest["target"] in ("cpu", "torch")
    assert _siblings(target) == []
