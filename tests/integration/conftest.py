"""Storage for the checkpoint tests: every test that takes `url` runs on local disk, memory://
and the S3 API server on 127.0.0.1."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ..conftest import S3_BUCKET


def storage_url(kind: str, tmp_path: Path) -> str:
    return {
        "local": str(tmp_path / "ckpt"),
        "memory": f"memory://ckpt-{uuid.uuid4().hex}",
        "s3": f"s3://{S3_BUCKET}/ckpt-{uuid.uuid4().hex}",
    }[kind]


@pytest.fixture(params=["local", "memory", "s3"])
def url(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    return storage_url(request.param, tmp_path)


@pytest.fixture(params=["memory", "s3"])
def object_url(request, tmp_path):
    """Object stores only (the commit is a create-only marker there)."""
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    return storage_url(request.param, tmp_path)


@pytest.fixture(params=["local", "s3"])
def shared_url(request, tmp_path):
    """Storage that a second process sees (memory:// is per process)."""
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    return storage_url(request.param, tmp_path)
