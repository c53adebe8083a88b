"""A throw-away S3 on loopback (moto) and a DVC environment that reads nothing of the machine.

For the code that runs real ``dvc push``/``pull`` against S3 without an AWS account: the private
remote tests (``tests/test_private_remote.py``, ``tests/test_collaborator_e2e.py``) and the
storage benchmark (``bench/storage_bench.py``, run as a script, so it can import only the
package). No stage imports this module; ``moto`` (pinned in ``requirements.txt``) is imported
only when a server starts.

- :func:`moto_s3_server`: moto's in-memory S3 on ``127.0.0.1``, on a port the OS picks.
- :func:`moto_client`: a boto3 client for that endpoint (moto's test keys by default).
- :func:`isolated_dvc_env`: the environment for git/DVC subprocesses: no inherited ``AWS_*``,
  ``DVC_*`` or ``GIT_*`` setting, home and DVC global/system/site directories in a given
  folder, so neither real credentials nor global DVC remotes can leak in or be touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

#: The region every client and DVC subprocess is told (moto accepts any; this one needs no
#: ``LocationConstraint`` when creating buckets).
REGION = "us-east-1"
#: moto's documented test credentials; they open nothing outside the loopback server.
MOTO_KEY = "testing"


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run moto's S3 server on ``127.0.0.1`` for the ``with`` block; yields its endpoint URL.

    Port 0: the OS picks a free port, so there is no race between choosing and binding. The
    server runs in threads of this process and is stopped on exit, also after an error.
    werkzeug's per-request log lines are raised to WARNING: one line per S3 request drowns the
    useful part of a failure report (a caller may lower it again to watch requests).
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def moto_client(endpoint: str, service: str = "s3", key: str = MOTO_KEY, secret: str = MOTO_KEY):
    """A boto3 client of ``service`` (``s3``, ``iam``, ...) for ``endpoint`` in :data:`REGION`.

    ``key``/``secret``: the access key it signs with (moto's test keys by default; an IAM user's
    key once the server enforces authentication).
    """
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=key, aws_secret_access_key=secret)


def isolated_dvc_env(home: str | Path, **extra: str) -> dict[str, str]:
    """Environment for git/DVC subprocesses that reads no user or machine configuration.

    Parameters
    ----------
    home
        A folder of the caller's; ``home/home`` becomes ``HOME`` (AWS config and credentials
        files point into it and do not exist unless the caller writes them), ``home/dvc_global``
        (analytics and update checks off), ``home/dvc_system`` and ``home/dvc_site`` (DVC's site
        cache, with its remote index) are DVC's config and cache directories. Created if missing.
    extra
        Variables set last (e.g. moto's keys, ``PYTHONPATH``); they win over the ones above.

    Returns a copy of ``os.environ`` without any ``AWS_*``, ``DVC_*`` or ``GIT_*`` variable, plus
    the above, ``AWS_EC2_METADATA_DISABLED``, ``AWS_DEFAULT_REGION`` (:data:`REGION`), DVC
    analytics and Studio off, and ``GIT_CONFIG_NOSYSTEM``.
    """
    home = Path(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    for name in ("home", "dvc_global", "dvc_system", "dvc_site"):
        (home / name).mkdir(parents=True, exist_ok=True)
    (home / "dvc_global" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    env.update(
        HOME=str(home / "home"),
        AWS_CONFIG_FILE=str(home / "home" / "aws_config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "home" / "aws_credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION=REGION,
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc_global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc_system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc_site"),
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="1",
        GIT_CONFIG_NOSYSTEM="1",
    )
    env.update(extra)
    return env
