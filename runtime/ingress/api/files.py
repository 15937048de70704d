"""OpenAI's /v1/files: upload (multipart/form-data with `file` and `purpose`), list, retrieve, content, delete.

Bodies are stored by runtime/ingress/store/files.py; disk work runs in a thread so the event loop keeps serving."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from httpd import HttpError, Request, Response, json_response, path_segment
from runtime.ingress.store.files import FileStore

UPLOAD_PURPOSES = ("batch",)  # what this server does something with
LIST_LIMIT_MAX = 10000  # OpenAI's


class FilesApi:
    def __init__(self, files: FileStore, max_file_bytes: int):
        self.files = files
        self.max_file_bytes = max_file_bytes

    async def upload(self, request: Request) -> Response:
        fields = _multipart(request)
        purpose = fields.get("purpose")
        if purpose is None:
            raise HttpError(400, "purpose: required (a form field)", "purpose")
        purpose_text = purpose[1].decode(errors="replace")
        if purpose_text not in UPLOAD_PURPOSES:
            raise HttpError(400, f"purpose: only {', '.join(UPLOAD_PURPOSES)!r} is supported, got {purpose_text!r}",
                            "purpose")
        upload = fields.get("file")
        if upload is None or upload[0] is None:
            raise HttpError(400, "file: required (a form field with a filename)", "file")
        filename, data = upload
        if len(data) > self.max_file_bytes:
            raise HttpError(413, f"file: {len(data)} bytes; at most {self.max_file_bytes} (--file-max-bytes)", "file")
        if not data.strip():
            raise HttpError(400, "file: the file is empty", "file")
        record = await asyncio.to_thread(self.files.create, filename, purpose_text, [data])
        return json_response(record.to_openai())

    async def list(self, request: Request) -> Response:
        query = query_params(request)
        limit = int_param(query, "limit", LIST_LIMIT_MAX, 1, LIST_LIMIT_MAX)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise HttpError(400, f"order: must be asc or desc, got {order!r}", "order")
        purpose = query.get("purpose")
        records, has_more = await asyncio.to_thread(self.files.list, purpose, limit, query.get("after"),
                                                    order == "desc")
        data = [r.to_openai() for r in records]
        return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    def retrieve(self, request: Request) -> Response:
        return json_response(self._record(request).to_openai())

    async def content(self, request: Request) -> Response:
        record = self._record(request)
        try:
            data = await asyncio.to_thread(self.files.read, record.id)
        except FileNotFoundError:
            raise HttpError(404, f"file {record.id} was deleted", "file_id") from None
        return Response(200, data, b"application/octet-stream")

    async def delete(self, request: Request) -> Response:
        file_id = path_segment(request, 3)
        if not await asyncio.to_thread(self.files.delete, file_id):
            raise HttpError(404, f"no file with id {file_id!r}", "file_id")
        return json_response({"id": file_id, "object": "file", "deleted": True})

    def _record(self, request: Request):
        file_id = path_segment(request, 3)
        record = self.files.get(file_id)
        if record is None:
            raise HttpError(404, f"no file with id {file_id!r}", "file_id")
        return record


def _multipart(request: Request) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename or None, value)."""
    kind, options = parse_options_header(request.header(b"content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HttpError(400, "the body must be multipart/form-data with a boundary (fields file and purpose)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    part: dict = {}

    def on_part_begin():
        part.clear()
        part.update(headers={}, data=[], header_name=b"", header_value=b"")

    def on_header_field(data, start, end):
        part["header_name"] += data[start:end]

    def on_header_value(data, start, end):
        part["header_value"] += data[start:end]

    def on_header_end():
        part["headers"][part["header_name"].lower()] = part["header_value"]
        part["header_name"], part["header_value"] = b"", b""

    def on_part_data(data, start, end):
        part["data"].append(data[start:end])

    def on_part_end():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition"))
        name = disposition.get(b"name")
        if name is not None:
            filename = disposition.get(b"filename")
            fields[name.decode(errors="replace")] = (filename.decode(errors="replace") if filename is not None
                                                     else None, b"".join(part["data"]))

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(request.body)
        parser.finalize()
    except MultipartParseError as err:
        raise HttpError(400, f"malformed multipart body: {err}") from None
    return fields


def query_params(request: Request) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(request.query).items()}


def int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise HttpError(400, f"{name}: expected an integer, got {text!r}", name) from None
    if not low <= value <= high:
        raise HttpError(400, f"{name}: must be in [{low}, {high}], got {value}", name)
    return value
