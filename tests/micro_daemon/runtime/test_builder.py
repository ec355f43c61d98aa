from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from micro.errors import BadRequest
from micro_daemon.runtime.builder import Build, Builder, BuildError, Change, _run, classify

HELLOWORLD = """\
syntax = "proto3";
package helloworld;
import "google/protobuf/timestamp.proto";

// Helloworld greets whoever calls.
service Helloworld {
  // Call says hello.
  rpc Call(CallRequest) returns (CallResponse);
}
message CallRequest { string name = 1; }
message CallResponse { string message = 1; google.protobuf.Timestamp at = 2; }
"""

MAIN = "from proto import helloworld_pb2, helloworld_pb2_grpc\nprint(helloworld_pb2.CallRequest(name='x'))\n"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "helloworld"
    (folder / "proto").mkdir(parents=True)
    (folder / "proto" / "helloworld.proto").write_text(HELLOWORLD)
    (folder / "main.py").write_text(MAIN)
    return folder


@pytest.fixture
def builder(tmp_path: Path) -> Builder:
    return Builder(tmp_path / "cache")


def run(python: Path, source: Path, code: str) -> str:
    done = subprocess.run([python, "-c", code], cwd=source, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def schema_files(schema: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = descriptor_pb2.FileDescriptorSet.FromString(schema.read_bytes()).file
    return {file.name: file for file in files}


# -- protos --------------------------------------------------------------------------------------


async def test_protos_compile_next_to_their_source(builder: Builder, source: Path) -> None:
    build = await builder.build(source)

    generated = sorted(p.name for p in (source / "proto").iterdir())
    assert generated == [
        "helloworld.proto",
        "helloworld_pb2.py",
        "helloworld_pb2.pyi",
        "helloworld_pb2_grpc.py",
    ]
    assert build.source == source and build.env_dir is None
    assert build.python == Path(sys.executable)
    assert 'name: "x"' in run(build.python, source, MAIN)


async def test_the_schema_keeps_comments_and_imports(builder: Builder, source: Path) -> None:
    build = await builder.build(source)

    assert build.schema is not None and build.schema.is_relative_to(builder.cache_dir / "schemas")
    files = schema_files(build.schema)
    assert set(files) == {"proto/helloworld.proto", "google/protobuf/timestamp.proto"}
    comments = [loc.leading_comments for loc in files["proto/helloworld.proto"].source_code_info.location]
    assert " Helloworld greets whoever calls.\n" in comments
    assert " Call says hello.\n" in comments


async def test_a_second_build_of_the_same_content_is_a_cache_hit(builder: Builder, source: Path) -> None:
    first = await builder.build(source)
    stamp = (source / "proto" / "helloworld_pb2.py").stat().st_mtime_ns

    began = time.perf_counter()
    second = await builder.build(source)
    assert time.perf_counter() - began < 0.2
    assert second == first
    assert (source / "proto" / "helloworld_pb2.py").stat().st_mtime_ns == stamp


async def test_missing_or_stale_outputs_are_regenerated(builder: Builder, source: Path) -> None:
    proto = source / "proto" / "helloworld.proto"
    generated = source / "proto" / "helloworld_pb2.pyi"
    first = await builder.build(source)
    generated.unlink()
    assert await builder.build(source) == first
    assert generated.exists()

    proto.write_text(HELLOWORLD.replace("string name = 1;", "string name = 1; int32 count = 2;"))
    changed = await builder.build(source)
    assert changed.schema != first.schema and "count" in generated.read_text()
    proto.write_text(HELLOWORLD)  # back to the first content: its schema is cached, its code is not current
    assert await builder.build(source) == first
    assert "count" not in generated.read_text()


async def test_a_broken_proto_fails_with_protocs_message(builder: Builder, source: Path) -> None:
    (source / "proto" / "helloworld.proto").write_text(
        HELLOWORLD.replace("string name = 1;", "string name 1;")
    )

    with pytest.raises(BuildError) as caught:
        await builder.build(source)
    assert isinstance(caught.value, BadRequest)
    assert "\nproto/helloworld.proto:10:35: Missing field number." in caught.value.detail
    assert caught.value.output
    assert not list((builder.cache_dir / "schemas").glob("*.binpb"))


async def test_without_protos_there_is_no_schema(builder: Builder, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "main.py").write_text("print('hi')\n")
    build = await builder.build(folder)
    assert build == Build(folder, Path(sys.executable), None, build.build_id, None)


async def test_protos_false_returns_the_cached_schema_only(builder: Builder, source: Path) -> None:
    skipped = await builder.build(source, protos=False)
    assert skipped.schema is None and not (source / "proto" / "helloworld_pb2.py").exists()
    built = await builder.build(source)
    assert (await builder.build(source, protos=False)).schema == built.schema


async def test_folders_that_are_not_source_are_skipped(builder: Builder, source: Path) -> None:
    for skipped in (".venv", "venv", ".git", "__pycache__", "node_modules"):
        (source / skipped).mkdir()
        (source / skipped / "other.proto").write_text("this is not a proto")
    build = await builder.build(source)
    assert build.schema is not None
    assert set(schema_files(build.schema)) == {"proto/helloworld.proto", "google/protobuf/timestamp.proto"}


async def test_not_a_folder(builder: Builder, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a folder"):
        await builder.build(tmp_path / "missing")


# -- build id ------------------------------------------------------------------------------------


async def test_build_id_follows_the_relevant_content_only(builder: Builder, source: Path) -> None:
    first = (await builder.build(source)).build_id
    assert len(first) == 12
    (source / "README.md").write_text("docs")
    (source / "__pycache__").mkdir(exist_ok=True)
    (source / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (source / "proto" / "helloworld_pb2.py").write_text("# edited generated code")
    assert (await builder.build(source, protos=False)).build_id == first

    (source / "main.py").write_text(MAIN + "# changed\n")
    assert (await builder.build(source)).build_id != first


# -- environments --------------------------------------------------------------------------------


async def test_requirements_without_requirement_lines_need_no_environment(
    builder: Builder, source: Path
) -> None:
    (source / "requirements.txt").write_text("# nothing yet\n\n   \n")
    build = await builder.build(source)
    assert build.env_dir is None and build.python == Path(sys.executable)


async def test_an_installed_requirement_builds_a_cached_environment(builder: Builder, source: Path) -> None:
    (source / "requirements.txt").write_text("# the daemon has it already\nprotobuf  # no download\n")
    assert (await builder.build(source, deps=False)).env_dir is None  # deps=False only looks in the cache

    first, again = await asyncio.gather(builder.build(source), Builder(builder.cache_dir).build(source))
    assert first == again
    assert first.env_dir is not None and first.env_dir.parent == builder.cache_dir / "envs"
    assert first.python == first.env_dir / "bin" / "python"
    assert [p.name for p in first.env_dir.parent.iterdir() if p.is_dir()] == [first.env_dir.name]
    imports = "import micro, grpc, google.protobuf, sys; from proto import helloworld_pb2; print(sys.prefix)"
    assert run(first.python, source, imports).strip() == str(first.env_dir)

    (source / "main.py").write_text(MAIN + "# code change, same requirements\n")
    began = time.perf_counter()
    assert (await builder.build(source)).env_dir == first.env_dir
    assert time.perf_counter() - began < 0.2
    assert (await builder.build(source, deps=False)).env_dir == first.env_dir


async def test_a_cancelled_tool_is_killed(tmp_path: Path) -> None:
    running = asyncio.ensure_future(_run(["sleep", "60"], cwd=tmp_path))
    await asyncio.sleep(0.1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 2)


@pytest.mark.slow
async def test_a_requirement_that_does_not_install_leaves_no_environment(
    builder: Builder, source: Path
) -> None:
    (source / "requirements.txt").write_text("micro-no-such-package-xyz==0.0.1\n")

    with pytest.raises(BuildError) as caught:
        await builder.build(source)
    assert "micro-no-such-package-xyz" in caught.value.detail
    assert "ERROR" in caught.value.detail
    assert [p.name for p in (builder.cache_dir / "envs").iterdir() if p.is_dir()] == []


# -- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("main.py", Change.CODE),
        ("handler/greeter.py", Change.CODE),
        ("proto/helloworld.proto", Change.PROTO),
        ("requirements.txt", Change.DEPS),
        ("docs/requirements.txt", Change.NONE),
        ("proto/helloworld_pb2.py", Change.NONE),
        ("proto/helloworld_pb2_grpc.py", Change.NONE),
        ("proto/helloworld_pb2.pyi", Change.NONE),
        ("__pycache__/main.cpython-311.pyc", Change.NONE),
        ("handler/__pycache__/x.py", Change.NONE),
        (".venv/lib/python3.11/site-packages/six.py", Change.NONE),
        ("venv/lib/x.py", Change.NONE),
        ("node_modules/x/y.proto", Change.NONE),
        (".git/index", Change.NONE),
        ("main.py~", Change.NONE),
        (".main.py.swp", Change.NONE),
        ("main.py.swp", Change.NONE),
        (".#main.py", Change.NONE),
        ("README.md", Change.NONE),
    ],
)
def test_classify_one_file(tmp_path: Path, name: str, change: Change) -> None:
    assert classify({tmp_path / name}, tmp_path) is change
    assert classify({Path(name)}, tmp_path) is change


def test_classify_combines_and_ignores_outside_paths(tmp_path: Path) -> None:
    changed = {tmp_path / "main.py", tmp_path / "proto" / "a.proto", tmp_path / "proto" / "a_pb2.py"}
    assert classify(changed, tmp_path) == Change.CODE | Change.PROTO
    assert classify({tmp_path.parent / "elsewhere.py"}, tmp_path) is Change.NONE
    assert classify(set(), tmp_path) is Change.NONE


async def test_two_same_size_saves_within_a_second_never_run_old_bytecode(tmp_path: Path) -> None:
    source = tmp_path / "svc"
    source.mkdir()
    module = source / "answer.py"
    builder = Builder(tmp_path / "cache")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # Python writes .pyc
    for word in ("first", "other"):  # same length: same size, and within the same second
        module.write_text(f"WORD = {word!r}\n")
        os.utime(module, (1_700_000_000, 1_700_000_000))
        await builder.build(source)
        ran = subprocess.run(
            [sys.executable, "-c", "import answer; print(answer.WORD)"],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert ran.stdout.strip() == word
