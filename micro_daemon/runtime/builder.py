"""Build a service from its source folder: compile its protos, install its requirements.

Both steps are cached by content hash under ``cache_dir``::

    schemas/<hash>.binpb   FileDescriptorSet of the protos, with comments and imports
    schemas/<hash>.json    the files protoc wrote next to the protos, with their sha256
    envs/<hash>/           a venv with requirements.txt installed; it sees the daemon's
                           packages (micro, grpc, protobuf) through a .pth file
    envs/<hash>.lock       held while that venv is built, by any daemon sharing the cache

``classify`` tells the watcher which of the steps a set of saved files calls for.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import hashlib
import json
import os
import py_compile
import secrets
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import micro
from micro.errors import BadRequest

__all__ = ["Build", "BuildError", "Builder", "Change", "classify"]

REQUIREMENTS = "requirements.txt"
SKIP_DIRS = frozenset({".venv", "venv", ".git", "__pycache__", "node_modules"})
_GENERATED = ("_pb2.py", "_pb2_grpc.py", ".pyi")
_EDITOR_TEMP = (".swp", ".swx", "~")
_PROTO_OUTPUTS = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_PIP_OPTIONS = ["--disable-pip-version-check", "--no-input", "--timeout", "15", "--retries", "1"]
_LOCK_POLL = 0.05


class Change(enum.Flag):
    """What a set of changed files calls for: new code, new protos, new dependencies."""

    NONE = 0
    CODE = enum.auto()
    PROTO = enum.auto()
    DEPS = enum.auto()


class BuildError(BadRequest):
    """A service's source does not build; ``detail`` has the tool's message, ``output`` all of it."""

    def __init__(self, detail: str, *, output: str = "") -> None:
        super().__init__(detail, id="runtime.build")
        self.output = output


@dataclass(frozen=True)
class Build:
    """A built service: run ``python`` in ``source``; register ``schema``; show ``build_id``.

    ``schema`` is ``None`` without protos, ``env_dir`` ``None`` without requirements
    (then ``python`` is the daemon's own interpreter).
    """

    source: Path
    python: Path
    schema: Path | None
    build_id: str
    env_dir: Path | None


def classify(changed: Iterable[Path], source: Path) -> Change:
    """What the saved files in ``changed`` call for (paths absolute or relative to ``source``).

    ``*.proto`` → PROTO, the top-level ``requirements.txt`` → DEPS, ``*.py`` → CODE.
    Generated code, ``__pycache__``, virtualenvs, ``.git``, hidden files and
    editor temporaries change nothing, nor does anything outside ``source``.
    """
    change = Change.NONE
    for path in changed:
        rel = _relative(path, source)
        if rel is not None:
            change |= _kind(rel)
    return change


@dataclass(frozen=True)
class _Tree:
    """What a scan of the source folder found."""

    build_id: str
    protos: list[Path]
    protos_key: str
    requirements: list[str]


class Builder:
    """Builds service sources, caching protos and environments under ``cache_dir``.

    Safe to share, and to run in several daemons on one cache: concurrent builds
    of one source folder, or of one set of requirements, wait for each other
    through lock files. Tools run as subprocesses; the event loop never blocks.
    An environment is keyed by the text of ``requirements.txt``: what its ``-r``
    includes or local paths point at is not part of the key.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._compiled: dict[Path, str] = {}

    async def build(self, source: Path, *, protos: bool = True, deps: bool = True) -> Build:
        """Build ``source``; ``BuildError`` with the tool's message when a step fails.

        ``protos=False`` or ``deps=False`` skips running that step: the result then
        holds what the cache has for the current content, or ``None``.
        """
        source = source.resolve()
        if not source.is_dir():
            raise BuildError(f"{source} is not a folder")
        tree = await asyncio.to_thread(_scan, source)
        if self._compiled.get(source) != tree.build_id:
            await asyncio.to_thread(_compile_bytecode, source)
            self._compiled[source] = tree.build_id
        schema = await self._protos(source, tree, compile=protos)
        env_dir = await self._env(source, tree.requirements, install=deps)
        python = _python(env_dir) if env_dir is not None else Path(sys.executable)
        return Build(source, python, schema, tree.build_id, env_dir)

    async def _protos(self, source: Path, tree: _Tree, *, compile: bool) -> Path | None:
        if not tree.protos:
            return None
        schema = self.cache_dir / "schemas" / f"{tree.protos_key}.binpb"
        if await asyncio.to_thread(_protos_current, source, schema):
            return schema
        if not compile:
            return schema if schema.exists() else None
        # Keyed by folder, not content: two builds of one folder write the same generated files.
        folder_key = hashlib.sha256(str(source).encode()).hexdigest()[:32]
        async with _file_lock(self.cache_dir / "locks", f"{folder_key}.lock"):
            if not await asyncio.to_thread(_protos_current, source, schema):
                await _protoc(source, tree.protos, schema)
        return schema

    async def _env(self, source: Path, requirements: list[str], *, install: bool) -> Path | None:
        if not requirements:
            return None
        envs = self.cache_dir / "envs"
        final = envs / _env_key(requirements)
        if final.is_dir():
            return final
        if not install:
            return None
        async with _file_lock(envs, f"{final.name}.lock"):
            if not final.is_dir():
                await _create_env(source, final)
        return final


# -- scanning -------------------------------------------------------------------------------------


def _relative(path: Path, source: Path) -> Path | None:
    if not path.is_absolute():
        return path
    for base, target in ((source, path), (source.resolve(), path.resolve())):
        with contextlib.suppress(ValueError):
            return target.relative_to(base)
    return None


def _ignored(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(".") or name.endswith(_EDITOR_TEMP)


def _kind(rel: Path) -> Change:
    if not rel.parts or any(_ignored(part) for part in rel.parts):
        return Change.NONE
    name = rel.name
    if rel == Path(REQUIREMENTS):
        return Change.DEPS
    if name.endswith(".proto"):
        return Change.PROTO
    if name.endswith(".py") and not name.endswith(_GENERATED):
        return Change.CODE
    return Change.NONE


def _walk(source: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        base = Path(root).relative_to(source)
        yield from (base / name for name in sorted(files))


def _compile_bytecode(source: Path) -> None:
    """Compile the service's modules to hash-checked bytecode.

    Python's default bytecode is trusted while the source's mtime (in whole
    seconds) and size match: two same-size saves within a second would then
    run the old code after a reload. Hash-checked bytecode is validated
    against the source's content on every import, and stays hash-checked when
    Python rewrites it.
    """
    for relative in _walk(source):
        if relative.suffix == ".py":
            py_compile.compile(
                str(source / relative),
                doraise=False,
                quiet=2,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )


def _scan(source: Path) -> _Tree:
    relevant = [rel for rel in _walk(source) if _kind(rel) is not Change.NONE]
    contents = {rel: data for rel in relevant if (data := _read(source / rel)) is not None}
    protos = [rel for rel in contents if rel.suffix == ".proto"]
    requirements_text = contents.get(Path(REQUIREMENTS), b"").decode("utf-8", "replace")
    return _Tree(
        build_id=_digest(contents)[:12],
        protos=protos,
        protos_key=_digest({rel: contents[rel] for rel in protos}, _grpc_tools_version()),
        requirements=_requirement_lines(requirements_text),
    )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None  # saved by an editor's rename dance while we walked


def _digest(contents: dict[Path, bytes], *salt: str) -> str:
    digest = hashlib.sha256("\0".join(salt).encode())
    for rel, data in sorted(contents.items()):
        digest.update(f"\0{rel.as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _requirement_lines(text: str) -> list[str]:
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


# -- protos ---------------------------------------------------------------------------------------


@functools.cache
def _grpc_tools_version() -> str:
    return metadata.version("grpcio-tools")


def _stamp_path(schema: Path) -> Path:
    return schema.with_suffix(".json")


def _protos_current(source: Path, schema: Path) -> bool:
    try:
        stamp: dict[str, str] = json.loads(_stamp_path(schema).read_text())
    except (OSError, ValueError):
        return False
    return schema.exists() and all(_sha256(source / rel) == sha for rel, sha in stamp.items())


def _sha256(path: Path) -> str | None:
    data = _read(path)
    return None if data is None else hashlib.sha256(data).hexdigest()


async def _protoc(source: Path, protos: list[Path], schema: Path) -> None:
    schema.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = _partial(schema)
    argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{source}"]
    argv += [f"--python_out={source}", f"--pyi_out={source}", f"--grpc_python_out={source}"]
    # Comments (source info) let the registry show them; imports make the set self-contained.
    argv += [f"--descriptor_set_out={partial}", "--include_source_info", "--include_imports"]
    code, output = await _run([*argv, *(rel.as_posix() for rel in protos)], cwd=source)
    if code != 0:
        partial.unlink(missing_ok=True)
        message = output.strip().replace(f"{source}{os.sep}", "")  # paths as the user knows them
        raise BuildError(f"protoc failed in {source}:\n{message}", output=output)
    outputs = [rel.with_name(rel.stem + suffix) for rel in protos for suffix in _PROTO_OUTPUTS]
    stamp = {rel.as_posix(): sha for rel in outputs if (sha := _sha256(source / rel)) is not None}
    _write_atomic(_stamp_path(schema), json.dumps(stamp, indent=1).encode())
    os.replace(partial, schema)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def _write_atomic(path: Path, data: bytes) -> None:
    partial = _partial(path)
    partial.write_bytes(data)
    os.replace(partial, path)


# -- environments ---------------------------------------------------------------------------------


def _shared_paths() -> list[str]:
    """The daemon's package folders, which every service environment falls back on."""
    paths = [*site.getsitepackages(), str(Path(micro.__file__).resolve().parent.parent)]
    return list(dict.fromkeys(paths))


def _env_key(requirements: list[str]) -> str:
    # The daemon's interpreter and package folders are part of the key: the venv links to both.
    salt = [sys.version, sys.executable, *_shared_paths()]
    return hashlib.sha256("\n".join([*salt, "", *requirements]).encode()).hexdigest()[:32]


def _python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def _site_packages(env_dir: Path) -> Path:
    return Path(sysconfig.get_path("purelib", "venv", {"base": str(env_dir), "platbase": str(env_dir)}))


@contextlib.asynccontextmanager
async def _file_lock(folder: Path, name: str) -> AsyncIterator[None]:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A blocking flock would stall the loop. Each open() is its own lock
                # holder, so this also orders builds within one process.
                await asyncio.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)


async def _create_env(source: Path, final: Path) -> None:
    """Build the venv in a temporary folder and rename it into place, or leave nothing."""
    for stale in final.parent.glob(f".{final.name}-*"):  # from a daemon killed mid-build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        await _make_venv(tmp)
        argv = [str(_python(tmp)), "-m", "pip", "install", *_PIP_OPTIONS, "-r", str(source / REQUIREMENTS)]
        code, output = await _run(argv, cwd=source)
        if code != 0:
            raise BuildError(f"pip install failed in {source}:\n{_pip_errors(output)}", output=output)
        _relocate(tmp, final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


async def _make_venv(env_dir: Path) -> None:
    # Without its own pip the venv builds in ~0.1 s instead of ~3 s; it then runs the
    # daemon's pip, which it reaches through the same .pth as micro and grpc.
    needs_pip = util.find_spec("pip") is None
    argv = [sys.executable, "-m", "venv", *([] if needs_pip else ["--without-pip"]), str(env_dir)]
    code, output = await _run(argv, cwd=env_dir)
    if code != 0:
        raise BuildError(f"cannot create a virtualenv:\n{output.strip()}", output=output)
    pth = _site_packages(env_dir) / "_micro_daemon.pth"
    pth.write_text("".join(f"{path}\n" for path in _shared_paths()))


def _relocate(tmp: Path, final: Path) -> None:
    """Point the scripts pip wrote (``#!<tmp>/bin/python``) at the folder they will live in."""
    old, new = str(tmp).encode(), str(final).encode()
    for path in [*(tmp / "bin").iterdir(), tmp / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024 * 1024:
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _pip_errors(output: str) -> str:
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("ERROR") or "error:" in line.lower()]
    return "\n".join(errors or lines[-20:])


# -- subprocesses ---------------------------------------------------------------------------------


async def _run(argv: list[str], *, cwd: Path) -> tuple[int, str]:
    """Run a tool to completion: its exit code and its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # pip's own children (build backends) too
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode("utf-8", "replace")
