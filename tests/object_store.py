"""A real S3 endpoint for the tests: moto's server mode on 127.0.0.1.

The server is a real S3 HTTP API in a thread of the test process. It is reached the
way a user reaches S3: through ``AWS_ENDPOINT_URL`` and the ``AWS_*`` credentials in
the environment, which boto3, pyarrow's ``S3FileSystem`` and Ray Data read. They are
set before any Ray session starts, so every Ray worker inherits them.

>>> endpoint = start_s3()  # doctest: +SKIP
>>> bucket = new_bucket(endpoint)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

# Dummy credentials: moto accepts any, and they must never be real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

_server = None
_buckets = itertools.count()


def start_s3() -> str:
    """Start the process's one moto server (once) and point the environment at it;
    return the endpoint URL (``http://127.0.0.1:PORT``)."""
    global _server
    if _server is None:
        from moto.server import ThreadedMotoServer

        # One access-log line per request would bury the test output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _server = server
    host, port = _server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    return endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"])


def new_bucket(endpoint: str, prefix: str = "freezelab-test") -> str:
    """A new, empty bucket on the endpoint; its name."""
    name = f"{prefix}-{os.getpid()}-{next(_buckets)}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> str:
    """Every file under ``folder`` to ``s3://bucket/prefix/...``; the folder's URI."""
    client = s3_client(endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{prefix}"


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys
