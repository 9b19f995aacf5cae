"""A run directory on a team's shared object store (issue 28, points 5 and 6). Every member of the
team holds credentials to the bucket, and an object store has no POSIX permissions: whoever can
read the victim's runs can read every object of them, and write any. The bucket here is the
suite's real S3 API server on 127.0.0.1 (moto), which takes any member's key; the attacker is a
second Unix user (tests/attacker.py) with a key of its own and nothing but curl.

- Point 5: the victim's job prints its job.pass_env secret and dies of an exception whose message
  puts the secret across the 500-character cut of a root cause. The attacker downloads every
  object of the run directory: neither the secret nor any piece of it is there, `<redacted>` is.
- Point 6: the attacker replaces the victim's record (events, run.yaml, metrics, TensorBoard
  scalars) with one whose every field is markup; the victim's `orch report` page holds that
  markup as text only."""

from __future__ import annotations

import html
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.spec.plan import REDACTED

from ..attacker import as_attacker, attacker_uid, needs_root
from ..conftest import S3_BUCKET, run_orch, write_config
from ..unit.test_report_escaping import (
    NUMBERS,
    SHOWN,
    T0,
    Page,
    assert_no_markup_from_the_run,
    crafted_run,
    figure_data,
    shown_escaped,
)

pytestmark = needs_root

SECRET_NAME = "ORCH_TEST_TEAM_TOKEN"
SECRET = "tok-9c3e51ab77d04f2a88b1e6c5"  # 28 characters, none of them in the filler
PIECE = 6  # the shortest run of the secret's characters that counts as a leak
CUT = 500  # supervision.failures.MESSAGE_LIMIT: where a root cause's message is cut
CAUSE_PREFIX = "RuntimeError: "  # how a root cause's message starts (its class, from the record)
# The secret starts 10 characters before the cut: its first 10 characters are in the cut message.
FILLER = "x" * (CUT - 10 - len(CAUSE_PREFIX))

# Both ranks print the secret; rank 0 then dies of an exception that holds it across the cut,
# rank 1 ends well (a rank log the supervisor did not have to stop).
LEAKY_JOB = f"""\
import os
secret = os.environ[{SECRET_NAME!r}]
print(f"rank {{os.environ['RANK']}} logs in with token={{secret}}", flush=True)
if os.environ["RANK"] == "0":
    raise RuntimeError({FILLER!r} + secret)
"""


def secret_pieces() -> set[str]:
    """Every run of PIECE characters of the secret (its start among them): found anywhere, a
    part of the secret was left in clear."""
    return {SECRET[i : i + PIECE] for i in range(len(SECRET) - PIECE + 1)}


def endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL"]  # set by the s3_server fixture


@pytest.fixture
def attacker_folder() -> Iterator[Path]:
    """A folder of the attacker's own, in /tmp (pytest's tmp_path is closed to others); the
    victim (root) reads what the attacker left there."""
    parent = Path(tempfile.mkdtemp(prefix="orch-bucket-attack-", dir="/tmp"))
    parent.chmod(0o755)
    folder = parent / "attacker"
    folder.mkdir(mode=0o700)
    os.chown(folder, attacker_uid(), attacker_uid())
    yield folder
    shutil.rmtree(parent, ignore_errors=True)


def team_root(tmp_path: Path, what: str) -> tuple[str, str]:
    """The team's storage root in the bucket: its s3:// URL and its key prefix."""
    prefix = f"team-{what}-{os.getpid()}-{tmp_path.name}"
    return f"s3://{S3_BUCKET}/{prefix}", prefix


# The attacker's requests, signed with its own key as a team member's are (unsigned, the server
# refuses to serve an object another member wrote).
CURL = "curl -sSf --aws-sigv4 aws:amz:us-east-1:s3 --user orch-attacker:its-own-secret"
# curl's default type for a body is a form, which the server reads as one: an object's bytes.
BINARY = "Content-Type: application/octet-stream"

# The attacker's download: list every key under PREFIX/ (one page: fewer than 1,000), GET each into
# objects/, its key's "/" written as "%".
DOWNLOAD = """\
cd {folder}
{curl} "{endpoint}/{bucket}?list-type=2&prefix={prefix}/" > listing.xml
grep -q '<IsTruncated>false</IsTruncated>' listing.xml
grep -o '<Key>[^<]*</Key>' listing.xml | sed -e 's/<Key>//' -e 's#</Key>##' > keys
mkdir objects
while read -r key; do
    {curl} -o "objects/$(printf %s "$key" | tr / %)" "{endpoint}/{bucket}/$key"
done < keys
"""


def download_as_attacker(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, as the attacker downloaded it with curl: key -> bytes."""
    as_attacker(
        DOWNLOAD.format(
            curl=CURL, folder=shlex.quote(str(folder)), endpoint=endpoint(), bucket=S3_BUCKET, prefix=prefix
        )
    )
    keys = (folder / "keys").read_text().split()
    return {key: (folder / "objects" / key.replace("/", "%")).read_bytes() for key in keys}


def leaks(objects: dict[str, bytes]) -> list[str]:
    """Each object that holds the secret or a piece of it, and what it holds."""
    found = []
    for key, data in sorted(objects.items()):
        text = data.decode("utf-8", errors="replace")
        pieces = sorted(p for p in secret_pieces() if p in text)
        if pieces:
            found.append(f"{key}: {'the whole secret' if SECRET in text else pieces}")
    return found


def test_a_team_member_reading_the_bucket_finds_no_piece_of_a_secret_cut_in_a_root_cause(
    s3_server, tmp_path, attacker_folder
):
    root, prefix = team_root(tmp_path, "secret")
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY_JOB)
    cfg = write_config(
        tmp_path, script, job={"pass_env": [SECRET_NAME]}, storage={"root": root}, restart={"max_restarts": 0}
    )
    victim = run_orch("run", str(cfg), "--run-id", "leaky", env={SECRET_NAME: SECRET})
    assert victim.returncode == 1, victim.stderr  # rank 0 died of its exception

    objects = download_as_attacker(attacker_folder, f"{prefix}/leaky")
    # The attacker read the run's real records: its events (one object each on an object store)
    # and both ranks' logs, none empty.
    events = b"".join(data for key, data in sorted(objects.items()) if "/leaky/events/" in key)
    logs = {key.rsplit("/", 1)[1]: data for key, data in objects.items() if "/leaky/logs/attempt-0/" in key}
    assert events and {"rank-0.log", "rank-1.log"} <= set(logs), sorted(objects)
    assert logs["rank-0.log"] and logs["rank-1.log"]
    leaked = leaks(objects)
    assert leaked == [], "the secret in the bucket:\n" + "\n".join(leaked)
    # The job did print and raise it, and the secret was where the root cause is cut: the
    # redaction marker stands in the logs and right after the filler.
    assert REDACTED.encode() in logs["rank-0.log"] and REDACTED.encode() in logs["rank-1.log"]
    causes = [
        record["root_cause"]["message"]
        for record in map(json.loads, events.splitlines())
        if record.get("root_cause")
    ]
    assert causes and set(causes) == {CAUSE_PREFIX + FILLER + REDACTED}, causes


# The attacker's rewrite of a run directory: the run's events deleted, then every file under
# CRAFTED PUT at its path under the run's prefix.
REWRITE = """\
cd {folder}
{curl} "{endpoint}/{bucket}?list-type=2&prefix={run}/events/" > listing.xml
grep -q '<IsTruncated>false</IsTruncated>' listing.xml
grep -o '<Key>[^<]*</Key>' listing.xml | sed -e 's/<Key>//' -e 's#</Key>##' > events
test -s events
while read -r key; do
    {curl} -X DELETE "{endpoint}/{bucket}/$key"
    echo "DELETE $key"
done < events
cd {crafted}
find . -type f | sed 's#^[.]/##' > ../crafted-files
while read -r name; do
    {curl} -X PUT -H '{binary}' --data-binary "@$name" "{endpoint}/{bucket}/{run}/$name"
    echo "PUT $name"
done < ../crafted-files
"""


# A script element, and quotes that end an attribute and add a handler to it.
HOSTILE = '<script>alert("orch")</script>"onmouseover="alert(1)" x="'


def crafted_objects(folder: Path) -> list[str]:
    """The record of tests/unit/test_report_escaping.py (every field markup: events, run.yaml,
    metrics.json, TensorBoard scalars) and a warning that is HOSTILE, as the attacker's files
    under `folder`, laid out as on an object store (one object per event under events/): their
    paths."""
    crafted_run(folder)
    ledger = folder / "events.jsonl"
    with ledger.open("a") as fh:
        fh.write(json.dumps({"time": T0 + 2.55, "event": "warning", "message": HOSTILE}) + "\n")
    (folder / "events").mkdir()
    for i, line in enumerate(ledger.read_text().splitlines()):
        when = json.loads(line)["time"]
        (folder / "events" / f"{round(when * 1e9):020d}-{i:08x}.json").write_text(line + "\n")
    ledger.unlink()
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, attacker_uid(), attacker_uid())
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_markup_a_team_member_puts_into_a_run_directory_is_only_text_in_the_victims_report(
    s3_server, tmp_path, attacker_folder
):
    root, prefix = team_root(tmp_path, "report")
    script = tmp_path / "done.py"
    script.write_text("print('done', flush=True)\n")
    cfg = write_config(
        tmp_path, script, storage={"root": root}, resources={"ranks_per_node": 1}, restart={"max_restarts": 0}
    )
    victim = run_orch("run", str(cfg), "--run-id", "shared")
    assert victim.returncode == 0, victim.stderr

    crafted = attacker_folder / "shared"  # run.yaml names the run by its folder
    names = crafted_objects(crafted)
    assert {"run.yaml", "metrics.json"} <= set(names) and any(n.startswith("tb/") for n in names)
    rewrite = as_attacker(
        REWRITE.format(
            curl=CURL,
            binary=BINARY,
            folder=shlex.quote(str(attacker_folder)),
            crafted=shlex.quote(crafted.name),
            endpoint=endpoint(),
            bucket=S3_BUCKET,
            run=f"{prefix}/shared",
        )
    )
    # Every request succeeded (curl -f): the victim's events gone, each crafted file in place.
    done = rewrite.stdout.splitlines()
    assert [line for line in done if line.startswith("DELETE ")], "the victim's events were not deleted"
    assert sorted(line.removeprefix("PUT ") for line in done if line.startswith("PUT ")) == names

    report = run_orch("report", "shared", "--config", str(cfg))
    assert report.returncode == 0, report.stderr
    page, raw = parse_report(f"{prefix}/shared/report.html")
    figures = figure_data(page.scripts)
    assert_no_markup_from_the_run(page, raw, figures, SHOWN + NUMBERS + ["metrics_name"], figures_made=3)
    assert HOSTILE not in raw and HOSTILE not in figures
    missing = [field for field in SHOWN if not shown_escaped(field, page, figures)]
    assert missing == [], f"the attacker's text not shown, so not tested: {missing}"
    assert HOSTILE in "".join(page.text) or html.escape(HOSTILE, quote=False) in figures


def parse_report(key: str) -> tuple[Page, str]:
    """The victim's report as its browser would get it from the bucket: parsed, and raw."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    raw = fs.cat_file(f"{S3_BUCKET}/{key}").decode("utf-8")
    page = Page()
    page.feed(raw)
    page.close()
    return page, raw
