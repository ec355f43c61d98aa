"""``micro new NAME``: write a complete service from ``templates/service``."""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Annotated

import typer

from micro_cli.errors import HandledError, UsageError

__all__ = ["new"]

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "service"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class FolderExists(HandledError):
    """``micro new`` never writes over an existing folder."""

    exit_code = 9


def new(name: Annotated[str, typer.Argument(help="Service name, e.g. helloworld or order-book.")]) -> None:
    """Create a new service in the folder NAME: proto, handler, entry point, tests, README."""
    if not _NAME.match(name):
        raise UsageError(
            f"invalid service name {name!r}: use lower-case letters, digits and single hyphens, "
            "starting with a letter (e.g. helloworld, order-book)"
        )
    target = Path(name)
    if target.exists():
        raise FolderExists(f"{target.resolve()} already exists: choose another name or remove it first")
    if not TEMPLATE.is_dir():
        raise HandledError(f"the service template is missing ({TEMPLATE}): reinstall micro with ./install.sh")
    names = _names(name)
    written = _render(target, names)
    _compile_protos(target)
    print(f"Creating service {name}\n")
    for path in written:
        print(f"  {path.relative_to(target.parent)}")
    print(
        f"\nNext:\n  cd {name}\n  micro run .\n"
        f'  micro call {name} {names["title"]}.Call \'{{"name": "Alice"}}\'\n'
        f"  micro logs {name}\n  python -m pytest tests"
    )


def _names(name: str) -> dict[str, str]:
    module = name.replace("-", "_")
    if keyword.iskeyword(module):
        module += "_service"
    return {
        "name": name,
        "module": module,
        "title": "".join(part.capitalize() for part in name.split("-")),
        "package": name.replace("-", ""),
    }


def _render(target: Path, names: dict[str, str]) -> list[Path]:
    written = []
    for template in sorted(TEMPLATE.rglob("*.tmpl")):
        relative = _fill(str(template.relative_to(TEMPLATE)), names).removesuffix(".tmpl")
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(template.read_text(), names))
        written.append(path)
    return written


def _fill(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _compile_protos(target: Path) -> None:
    """Generate the proto code now, so the handler's tests pass before the first ``micro run``."""
    from grpc_tools import protoc

    for proto in sorted(target.rglob("*.proto")):
        relative = proto.relative_to(target)
        args = ["protoc", f"-I{target}", f"--python_out={target}", f"--pyi_out={target}"]
        args += [f"--grpc_python_out={target}", str(relative)]
        if protoc.main([*args[:-1], str(proto)]) != 0:
            raise HandledError(f"the generated proto {relative} does not compile: please report this")
