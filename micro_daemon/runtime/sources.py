"""Where a service's source comes from: a local folder, a git repository, or an uploaded archive.

Git sources are ``URL[@ref]`` (``file:///srv/repo@v1``, ``https://host/org/repo@main``,
optionally ``URL//sub/folder@ref`` for a service inside a repository); they are
fetched by the daemon, again on every ``resolve`` (so ``micro update`` gets new
commits). Uploads are tar.gz archives sent through ``Runtime.Upload`` and referred
to as ``upload://<id>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path

from micro.errors import BadRequest, NotFound, PayloadTooLarge

__all__ = ["MAX_UPLOAD_BYTES", "Sources", "is_git"]

MAX_UPLOAD_BYTES = 256 * 1024 * 1024
_GIT = re.compile(r"^(?:https?|file|ssh|git)://|^git@")


def is_git(source: str) -> bool:
    return bool(_GIT.match(source))


class Sources:
    """Turns a source reference into a folder on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def resolve(self, source: str, *, namespace: str, name: str) -> Path:
        """The folder holding ``source``; ``NotFound``/``BadRequest`` saying what is wrong."""
        if source.startswith("upload://"):
            return self._upload_dir(source.removeprefix("upload://"))
        if is_git(source):
            return await self._clone(source, namespace, name)
        folder = Path(source)
        if not folder.is_absolute():
            raise BadRequest(f"source {source!r} must be an absolute folder, a git URL or an upload")
        if not folder.is_dir():
            raise NotFound(f"source folder {source} does not exist on the server's machine")
        return folder

    def store_upload(self, data: bytes) -> str:
        """Unpack a tar.gz archive and return its ``upload://<id>``."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"the upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
        upload_id = uuid.uuid4().hex
        target = self.root / "uploads" / upload_id
        target.mkdir(parents=True, mode=0o700)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                archive.extractall(target, filter="data")  # "data" refuses absolute paths and ../
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise BadRequest(f"the upload is not a tar.gz archive of a folder: {exc}") from exc
        return f"upload://{upload_id}"

    def discard(self, folder: Path) -> None:
        """Delete a clone or an upload that ``folder`` is in; any other folder is left alone."""
        try:
            parts = folder.resolve().relative_to(self.root.resolve()).parts
        except ValueError:
            return
        depth = {"uploads": 2, "git": 3}.get(parts[0] if parts else "", 0)  # uploads/ID, git/NS/NAME-HASH
        if depth and len(parts) >= depth:
            shutil.rmtree(self.root.joinpath(*parts[:depth]), ignore_errors=True)

    def _upload_dir(self, upload_id: str) -> Path:
        folder = self.root / "uploads" / upload_id
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id) or not folder.is_dir():
            raise NotFound(f"no upload with id {upload_id!r}: upload the source again")
        return folder

    async def _clone(self, source: str, namespace: str, name: str) -> Path:
        url, ref = _split_ref(source)
        url, subfolder = _split_subfolder(url)
        digest = hashlib.sha256(f"{url}@{ref}".encode()).hexdigest()[:16]
        target = self.root / "git" / namespace / f"{name}-{digest}"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            await _git(f"cannot clone {url}", "clone", "--quiet", url, str(fresh))
            if ref:
                await _git(f"cannot check out {ref!r} of {url}", "-C", str(fresh), "checkout", "--quiet", ref)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        # Only a good clone replaces the one that the running instances came from.
        await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
        fresh.rename(target)
        folder = target / subfolder if subfolder else target
        if not folder.is_dir():
            raise NotFound(f"{subfolder!r} is not a folder in {url}@{ref or 'HEAD'}")
        return folder


def _split_ref(source: str) -> tuple[str, str]:
    head, at, ref = source.rpartition("@")
    if at and "/" not in ref and ":" not in ref:  # an @ inside user@host is followed by host/...
        return head, ref
    return source, ""


def _split_subfolder(url: str) -> tuple[str, str]:
    """``scheme://host/repo//sub/folder`` names a folder inside the repository."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, ""
    repo, _, sub = rest.partition("//")
    return f"{scheme}{sep}{repo}", sub


async def _git(what: str, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "git",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},  # a daemon has no one to ask for a password
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise BadRequest(f"{what}: {_git_reason(stderr.decode(errors='replace'))}")


def _git_reason(stderr: str) -> str:
    """git's first ``fatal:``/``error:`` line says what went wrong; the advice after it does not."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        for prefix in ("fatal: ", "error: "):
            if line.startswith(prefix):
                return line.removeprefix(prefix)
    return " ".join(lines[-3:]) or "git failed and printed nothing"
