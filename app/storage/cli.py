"""`nexus storage ...`: upload, download, list, delete and sign objects."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli_group import NexusGroup

storage_cli = typer.Typer(
    cls=NexusGroup, help="Object storage buckets.", no_args_is_help=True
)


@storage_cli.command("upload")
def upload_command(
    bucket: Annotated[str, typer.Argument(help="Bucket name.")],
    path: Annotated[str, typer.Argument(help="Object path in the bucket.")],
    file: Annotated[Path, typer.Argument(help="Local file to upload; - for stdin.")],
    content_type: Annotated[
        str | None, typer.Option(help="MIME type; guessed from PATH when unset.")
    ] = None,
) -> None:
    """Upload FILE's bytes exactly as object PATH of BUCKET."""
    from app.cli import call_tool, print_json

    data = sys.stdin.buffer.read() if str(file) == "-" else _read_local(file)
    arguments: dict[str, Any] = {
        "bucket": bucket,
        "path": path,
        "content": base64.b64encode(data).decode("ascii"),
        "encoding": "base64",
    }
    if content_type:
        arguments["content_type"] = content_type
    print_json(call_tool("storage_upload", arguments))


@storage_cli.command("download")
def download_command(
    bucket: Annotated[str, typer.Argument(help="Bucket name.")],
    path: Annotated[str, typer.Argument(help="Object path in the bucket.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write; stdout if unset."),
    ] = None,
) -> None:
    """Write object PATH of BUCKET byte-exact to a file or stdout."""
    from app.cli import call_tool

    if output is not None:
        # Before the download, so that a mistyped path costs no transfer.
        _check_writable(output)
    result = call_tool(
        "storage_download", {"bucket": bucket, "path": path, "encoding": "base64"}
    )
    data = base64.b64decode(result["content"])
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        output.write_bytes(data)
    except OSError as error:
        typer.echo(
            f"error: could not write {output}: {_reason(error)}; the object was "
            "downloaded but not saved",
            err=True,
        )
        raise typer.Exit(1) from None
    typer.echo(f"wrote {len(data)} bytes to {output}", err=True)


def _reason(error: OSError) -> str:
    return (error.strerror or type(error).__name__).lower()


def _read_local(file: Path) -> bytes:
    """Read FILE, or exit 2 with one line naming it and what is wrong."""
    try:
        return file.read_bytes()
    except OSError as error:
        typer.echo(
            f"error: cannot read {file}: {_reason(error)}; pass an existing "
            "readable file, or - for stdin",
            err=True,
        )
        raise typer.Exit(2) from None


def _check_writable(output: Path) -> None:
    """Exit 2 with one line when OUTPUT is a folder or not in one."""
    problem = None
    if output.is_dir():
        problem = "it is a folder; pass a file path"
    elif output.parent.exists() and not output.parent.is_dir():
        problem = f"{output.parent} is not a folder; pass a path in a folder"
    elif not output.parent.exists():
        problem = (
            f"its folder {output.parent} does not exist; create it first or pass "
            "a path in an existing folder"
        )
    if problem is not None:
        typer.echo(f"error: cannot write {output}: {problem}", err=True)
        raise typer.Exit(2)


@storage_cli.command("list")
def list_command(
    bucket: Annotated[str, typer.Argument(help="Bucket name.")],
    prefix: Annotated[str, typer.Option(help="Only paths starting with this.")] = "",
    limit: Annotated[int, typer.Option(help="Objects to list at most.")] = 100,
) -> None:
    """List objects of BUCKET with size, sha256 and content type."""
    from app.cli import call_tool, print_json

    print_json(
        call_tool("storage_list", {"bucket": bucket, "path": prefix, "limit": limit})
    )


@storage_cli.command("delete")
def delete_command(
    bucket: Annotated[str, typer.Argument(help="Bucket name.")],
    path: Annotated[str, typer.Argument(help="Object path in the bucket.")],
) -> None:
    """Delete object PATH of BUCKET."""
    from app.cli import call_tool, print_json

    print_json(call_tool("storage_delete", {"bucket": bucket, "path": path}))


@storage_cli.command("url")
def url_command(
    bucket: Annotated[str, typer.Argument(help="Bucket name.")],
    path: Annotated[str, typer.Argument(help="Object path in the bucket.")],
    expires_in: Annotated[
        int, typer.Option(help="Seconds the URL stays valid.")
    ] = 3600,
) -> None:
    """Print a signed download URL for object PATH of BUCKET."""
    from app.cli import call_tool, print_json

    print_json(
        call_tool(
            "storage_get_url",
            {"bucket": bucket, "path": path, "expires_in": expires_in},
        )
    )
