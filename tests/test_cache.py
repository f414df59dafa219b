"""The cache root (pagedlm/cache.py): where it is, keys, atomic writes, locks, rebuilt entries,
the converted-tokenizer entry and ``pagedlm cache list / clear``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagedlm import cache


@pytest.fixture()
def root(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(d))
    return d


def _env(root: Path) -> dict:
    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PAGEDLM_CACHE_DIR": str(root), "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGEDLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "pagedlm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    assert cache.cache_root() == Path.home() / ".cache" / "pagedlm"
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    assert cache.cache_dir("tokenizers") == tmp_path / "mine" / "tokenizers"
    assert (tmp_path / "mine" / "tokenizers").is_dir()


@pytest.mark.parametrize("kind", ["", "../up", "a/b", "Tokens", 3, None])
def test_bad_kind_is_refused(root, kind):
    with pytest.raises(ValueError, match="invalid cache kind"):
        cache.cache_dir(kind)


def test_keys_are_plain_and_distinct():
    assert cache.key("a", 1) == cache.key("a", 1)
    assert len({cache.key("a", 1), cache.key("a", 1.0), cache.key("a", "1"), cache.key(["a", 1]),
                cache.key("a", 1, None), cache.key({"x": 1}), cache.key(b"a")}) == 7
    assert cache.key({"b": 1, "a": 2}) == cache.key({"a": 2, "b": 1})
    with pytest.raises(TypeError, match="object"):
        cache.key(object())
    with pytest.raises(ValueError, match="length"):
        cache.key("a", length=3)


def test_keys_stable_across_processes_and_change_with_the_file(root, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x" * 100)
    code = textwrap.dedent(f"""
        from pagedlm import cache
        print(cache.file_key({str(f)!r}), cache.key("kernels", 3, 2.5, None, [1, "a"], {{"k": True}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(root), capture_output=True, text=True, check=True)
    assert out.stdout.split() == [cache.file_key(f), cache.key("kernels", 3, 2.5, None, [1, "a"], {"k": True})]
    before = cache.file_key(f)
    assert cache.file_key(f) == before  # a stat, no change
    f.write_bytes(b"y" * 101)  # rewritten: size and mtime change
    assert cache.file_key(f) != before
    again = cache.file_key(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, touched
    assert cache.file_key(f) != again
    link = tmp_path / "link.gguf"
    link.symlink_to(f)
    assert cache.file_key(link) == cache.file_key(f)  # identity of the file, not of the name
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        cache.file_key(tmp_path / "nope.gguf")


def test_atomic_write_all_or_nothing(root):
    p = cache.cache_dir("compiled") / "entry.bin"
    cache.atomic_write(p, b"one")
    assert p.read_bytes() == b"one"
    with pytest.raises(RuntimeError), cache.atomic_path(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert p.read_bytes() == b"one"
    assert sorted(x.name for x in p.parent.iterdir()) == ["entry.bin"]  # no temporary left behind


def test_corrupt_entry_is_rebuilt_with_one_warning(root, caplog):
    builds = []

    def build(d: Path) -> str:
        builds.append(1)
        (d / "value.txt").write_text("42")
        return "42"

    def load(d: Path) -> str:
        text = (d / "value.txt").read_text()
        if text != "42":
            raise ValueError(f"corrupt value {text!r}")
        return text

    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        assert cache.cached_entry("things", "e-1", load, build) == "42"
        assert cache.cached_entry("things", "e-1", load, build) == "42"
        assert len(builds) == 1 and not caplog.records
        (root / "things" / "e-1" / "value.txt").write_text("garbage")
        assert cache.cached_entry("things", "e-1", load, build) == "42"
        assert len(builds) == 2
        assert len(caplog.records) == 1 and "rebuilt" in caplog.records[0].getMessage()
        assert "corrupt value" in caplog.records[0].getMessage()
        caplog.clear()
        (root / "things" / "e-1" / "value.txt").unlink()  # a partial entry
        assert cache.cached_entry("things", "e-1", load, build) == "42"
        assert len(builds) == 3 and len(caplog.records) == 1
    with pytest.raises(ValueError, match="invalid cache entry name"):
        cache.cached_entry("things", "../escape", load, build)


def test_unwritable_cache_builds_anyway_with_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(blocker / "cache"))  # a file in the way: cannot mkdir
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        assert cache.cached_entry("things", "e", lambda d: "cached", lambda d: "built") == "built"
    assert len(caplog.records) == 1 and "without it" in caplog.records[0].getMessage()


def test_two_processes_racing_build_once(root):
    """Both processes ask for the same missing entry at once: the lock makes one build it and
    the other load it; both get the value."""
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from pagedlm import cache

        def build(d):
            with open(sys.argv[1], "a") as log:
                log.write("build\\n")
            time.sleep(1.0)
            (d / "v").write_text("ok")
            return "ok"

        print(cache.cached_entry("race", "entry", lambda d: (d / "v").read_text(), build))
    """)
    log = root.parent / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(log)], env=_env(root), stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["ok", "ok"]
    assert log.read_text().count("build") == 1


def test_locked_excludes_another_process(root):
    target = root / "k" / "entry"
    code = textwrap.dedent(f"""
        import time
        from pagedlm import cache
        with cache.locked({str(target)!r}):
            print("locked", flush=True)
            time.sleep(1.5)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=_env(root), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    t = time.perf_counter()
    with cache.locked(target):
        waited = time.perf_counter() - t
    p.wait(timeout=60)
    assert waited > 0.5


def test_cache_cli_list_and_clear(root, capsys):
    from pagedlm.cli import main

    assert main(["cache", "list"]) == 0
    assert "nothing cached" in capsys.readouterr().out
    cache.atomic_write(cache.cache_dir("tokenizers") / "tok-abc", b"x" * 2048)
    (root / "kernels" / "int8_mm-123").mkdir(parents=True)  # as the kernels build lays it out
    (root / "kernels" / "int8_mm-123" / "lib.so").write_bytes(b"y" * 10)
    with cache.locked(root / "kernels" / "int8_mm-123"):
        pass  # leaves a .lock file, which is not an entry
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "kernels" in out and "int8_mm-123" in out and "tokenizers" in out and "tok-abc" in out
    assert "2.0 KiB" in out and "2 entries" in out and ".lock" not in out
    assert main(["cache", "clear", "--kind", "kernels"]) == 0
    assert "removed 1 entries of kind 'kernels'" in capsys.readouterr().out
    assert not (root / "kernels").exists() and (root / "tokenizers" / "tok-abc").exists()
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert cache.entries() == []
    with pytest.raises(SystemExit):
        main(["cache", "clear", "--kind", "../x"])
    assert "invalid cache kind" in capsys.readouterr().err


# ---- the tokenizer entry -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    from tests.test_gguf import _tiny, write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_gguf("qwen2", _tiny("qwen2"), path)
    return str(path)


def test_tokenizer_cached_and_corrupt_entry_rebuilt(root, tiny_gguf, caplog):
    from pagedlm.tokenizer import load_tokenizer

    text = "The quick brown fox, café"
    first = load_tokenizer(tiny_gguf, tiny_gguf)
    [entry] = cache.entries("tokenizers")
    assert entry.name.startswith("tiny-qwen2.gguf-") and (entry.path / "tokenizer.json").is_file()
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        second = load_tokenizer(tiny_gguf, tiny_gguf)  # from the entry
        assert not caplog.records
        assert second(text)["input_ids"] == first(text)["input_ids"]
        (entry.path / "tokenizer.json").write_text("{ truncated")
        third = load_tokenizer(tiny_gguf, tiny_gguf)
    assert len(caplog.records) == 1 and "rebuilt" in caplog.records[0].getMessage()
    assert third(text)["input_ids"] == first(text)["input_ids"]
    assert third.get_vocab() == first.get_vocab() and third.eos_token_id == first.eos_token_id
    assert [e.name for e in cache.entries("tokenizers")] == [entry.name]
    os.utime(tiny_gguf)  # the file changed: a new entry
    load_tokenizer(tiny_gguf, tiny_gguf)
    assert len(cache.entries("tokenizers")) == 2
