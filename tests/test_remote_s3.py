"""DVC remote storage on a real S3 server: moto's standalone server on a loopback port.

A temporary clone of this working tree keeps only the pipeline's cheap stages (base_model and
prepare, shrunk), runs them, pushes their outputs to a bucket, and a colleague's fresh clone pulls
them: `dvc status` is clean and `dvc repro` has nothing to do. A wrong secret key and a missing
bucket each fail `dvc push` with a message that names the problem.

The remote commands are those of docs/remote-storage.md (and the README's S3 section), word for
word: endpointurl in the committed config, credentials only in `.dvc/config.local`.
Runtime: ~100 s on 2 shared cores (4 tests; the two stages ~25 s, each dvc call a few seconds).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest_dvc import SMALL_TOWER

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHEAP_STAGES = ("base_model", "prepare")
BUCKET = "vqatune-dvc"
# moto enforces credentials once this many requests have gone through unauthenticated: the
# fixture's own IAM set-up (user, policy, key) and bucket creation use them up.
NO_AUTH_REQUESTS = 4

pytest.importorskip("dvc_s3", reason="needs dvc-s3 (requirements.txt)")
pytest.importorskip("moto.server", reason="needs moto[server] (requirements.txt)")


def run(args, cwd, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 that checks credentials, one IAM user's key pair allowed
    everything, and an empty bucket. Yields (endpoint url, access key id, secret key)."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(NO_AUTH_REQUESTS),
           "AWS_ACCESS_KEY_ID": "bootstrap", "AWS_SECRET_ACCESS_KEY": "bootstrap"}
    with log.open("w") as fh:
        server = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
        common = dict(endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **common)
        iam.create_user(UserName="dvc")
        iam.put_user_policy(UserName="dvc", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        boto3.client("s3", **common).create_bucket(Bucket=BUCKET)
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.setdefault("GIT_AUTHOR_NAME", "vqatune test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@vqatune.invalid")
    env["GIT_COMMITTER_NAME"], env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_NAME"], env["GIT_AUTHOR_EMAIL"]
    # Only what `dvc remote modify --local` writes may authenticate: no ambient AWS settings.
    for name in list(env):
        if name.startswith("AWS_"):
            del env[name]
    empty = tmp_path_factory.mktemp("aws") / "config"
    empty.write_text("")
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    return env


def add_s3_remote(clone: Path, env, endpoint: str, key_id: str, secret: str, bucket: str = BUCKET):
    """docs/remote-storage.md, word for word."""
    run(["dvc", "remote", "add", "-d", "-f", "s3", f"s3://{bucket}/vqatune"], clone, env)
    run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], clone, env)
    run(["dvc", "remote", "modify", "s3", "region", "us-east-1"], clone, env)
    run(["dvc", "remote", "modify", "--local", "s3", "access_key_id", key_id], clone, env)
    run(["dvc", "remote", "modify", "--local", "s3", "secret_access_key", secret], clone, env)


def set_credentials(clone: Path, env, key_id: str, secret: str):
    run(["dvc", "remote", "modify", "--local", "s3", "access_key_id", key_id], clone, env)
    run(["dvc", "remote", "modify", "--local", "s3", "secret_access_key", secret], clone, env)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env, s3):
    """A clone of this working tree (uncommitted changes included) cut down to the cheap
    stages, run and committed, with the S3 remote configured."""
    root = tmp_path_factory.mktemp("s3project")
    clone = root / "a"
    run(["git", "clone", "-q", REPO, clone], root, env)
    for rel in run(["git", "ls-files"], REPO, env).stdout.splitlines():
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    spec = yaml.safe_load((clone / "dvc.yaml").read_text())
    spec = {"stages": {name: spec["stages"][name] for name in CHEAP_STAGES}}
    (clone / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["prepare"]["synthetic_images"] = 12
    params["model"].update(SMALL_TOWER)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clone / "dvc.lock").unlink(missing_ok=True)
    endpoint, key_id, secret = s3
    add_s3_remote(clone, env, endpoint, key_id, secret)
    run(["dvc", "repro"], clone, env)
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "cheap stages on S3"], clone, env)
    # Credentials never reach git: only the committed config, no keys in it.
    config = (clone / ".dvc" / "config").read_text()
    assert endpoint in config and key_id not in config and secret not in config
    assert "config.local" not in run(["git", "ls-files", ".dvc"], clone, env).stdout
    return clone


def test_push_then_a_fresh_clone_pulls_a_clean_up_to_date_run(project, env, s3, tmp_path):
    import boto3

    endpoint, key_id, secret = s3
    pushed = run(["dvc", "push"], project, env).stdout
    assert "pushed" in pushed, pushed
    objects = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                           aws_secret_access_key=secret).list_objects_v2(Bucket=BUCKET)
    assert objects.get("KeyCount", 0) > 0

    colleague = tmp_path / "b"
    run(["git", "clone", "-q", project, colleague], tmp_path, env)
    set_credentials(colleague, env, key_id, secret)
    run(["dvc", "pull"], colleague, env)
    for out in ("models/base", "data/processed"):
        assert (colleague / out).is_dir() and any((colleague / out).iterdir()), out
    status = run(["dvc", "status"], colleague, env).stdout
    assert "Data and pipelines are up to date" in status, status
    cloud = run(["dvc", "status", "--cloud"], colleague, env).stdout
    assert "Cache and remote 's3' are in sync" in cloud, cloud
    again = run(["dvc", "repro"], colleague, env)
    assert "Running stage" not in again.stdout + again.stderr, again.stdout
    assert run(["git", "status", "--porcelain"], colleague, env).stdout == ""


# A wrong key id or secret: S3 answers dvc's first request (a HEAD, which carries no error body, on
# AWS as on moto) with a bare 403, so the message names the refusal, not which half was wrong.
@pytest.mark.parametrize("wrong", ["secret", "key_id"])
def test_wrong_credentials_fail_with_a_forbidden_error(project, env, s3, tmp_path, wrong):
    endpoint, key_id, secret = s3
    clone = tmp_path / "c"
    run(["git", "clone", "-q", project, clone], tmp_path, env)
    if wrong == "secret":
        set_credentials(clone, env, key_id, "not-the-secret")
    else:
        set_credentials(clone, env, "AKIANOTAREALKEY00000", secret)
    failed = run(["dvc", "pull"], clone, env, check=False)
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "failed to connect to s3" in message and "Forbidden" in message and "403" in message, message
    assert not (clone / "data" / "processed").exists()


def test_a_missing_bucket_fails_with_a_message_naming_it(project, env, s3, tmp_path):
    endpoint, key_id, secret = s3
    clone = tmp_path / "d"
    run(["git", "clone", "-q", project, clone], tmp_path, env)
    add_s3_remote(clone, env, endpoint, key_id, secret, bucket="no-such-bucket")
    for command in (["dvc", "push"], ["dvc", "pull"]):
        failed = run(command, clone, env, check=False)
        assert failed.returncode != 0, command
        message = failed.stdout + failed.stderr
        assert "NoSuchBucket" in message and "The specified bucket does not exist" in message, message
