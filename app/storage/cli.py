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

    data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
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

    result = call_tool(
        "storage_download", {"bucket": bucket, "path": path, "encoding": "base64"}
    )
    data = base64.b64decode(result["content"])
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(data)} bytes to {output}", err=True)


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
