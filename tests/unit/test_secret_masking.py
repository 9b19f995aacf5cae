"""job.pass_env values are redacted before any cut, a cut through one redacts its start too, and
the masker of ranks' output never lets one through, however the output was split."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from orchestrator.contract import (
    ENV_ERROR_FILE,
    ENV_PASS_ENV,
    MIN_SECRET_CHARS,
    REDACTED,
    SeenSecrets,
    exception_record,
    passed_secrets,
    redact_json,
    redact_text,
    secret_values,
)
from orchestrator.launch.masking import StreamMasker
from orchestrator.launch.processes import MaskedOutput
from orchestrator.supervision.failures import MESSAGE_LIMIT, RankFailure

SECRET = "hf_AbCdEfGhIjKlMnOpQr"
NAME = "HF_TOKEN_FOR_TEST"


def _recorded(message: str) -> RankFailure:
    record = {"type": "RuntimeError", "message": message, "time": 1.0}
    return RankFailure.from_record(record, rank=0, node_rank=0, exitcode=1, time=1.0)


def test_a_secret_across_the_500th_character_is_redacted_whole(monkeypatch):
    from orchestrator.supervision.loop import without_secrets

    monkeypatch.setenv(NAME, SECRET)
    prefix = "RuntimeError: "
    # The secret starts 10 characters before the cut: before the fix, the message was cut to 500
    # first and the loop's redaction found no whole secret, so "hf_AbCdEfG" was stored.
    message = "x" * (MESSAGE_LIMIT - 10 - len(prefix) - len("token=")) + f"token={SECRET} and more"
    assert (prefix + message).index(SECRET) == MESSAGE_LIMIT - 10
    stored = without_secrets(_recorded(message), (NAME,))
    recorded = json.dumps(stored.to_json())
    assert SECRET[:MIN_SECRET_CHARS] not in recorded and SECRET[:MIN_SECRET_CHARS] not in stored.describe
    assert json.loads(recorded)["message"].endswith(f"token={REDACTED}")  # exactly at the cut


def test_a_message_cut_before_it_reached_the_supervisor_ends_redacted():
    # A record written by another hook (torch elastic's) may be cut already, through a secret.
    cut = _recorded(f"bad login token={SECRET[:8]}").without_secrets((SECRET,))
    assert cut.message == f"RuntimeError: bad login token={REDACTED}"
    whole = _recorded(f"bad login token={SECRET}; retry").without_secrets((SECRET,))
    assert whole.message == f"RuntimeError: bad login token={REDACTED}; retry"
    # Fewer than MIN_SECRET_CHARS of a secret at the end tell nothing: left as they are.
    short = _recorded(f"ends with {SECRET[:3]}")
    assert short.without_secrets((SECRET,)) is short


def test_decisions_read_the_first_500_characters_as_before():
    # Kept whole for redaction, the message is still classified on what was read before.
    late = _recorded("x" * 600 + " Connection closed by peer")
    assert late.own and late.head == late.message[:MESSAGE_LIMIT]
    assert len(late.to_json()["message"]) == MESSAGE_LIMIT


def test_redact_text_redacts_before_the_cut_and_counts_a_cut_start_as_the_secret():
    text = f"{'a' * 10}{SECRET}{'b' * 10}"
    assert redact_text(text, [SECRET]) == f"{'a' * 10}{REDACTED}{'b' * 10}"
    assert redact_text(text, [SECRET], limit=15) == f"{'a' * 10}{REDACTED[:5]}"
    assert redact_text(f"x {SECRET[:MIN_SECRET_CHARS]}", [SECRET]) == f"x {REDACTED}"
    assert redact_text(f"x {SECRET[: MIN_SECRET_CHARS - 1]}", [SECRET]) == f"x {SECRET[:3]}"
    # A secret that holds another is replaced whole (secret_values sorts longest first).
    inner = SECRET[3:9]
    secrets = secret_values(["A", "B"], {"A": inner, "B": SECRET})
    assert secrets == (SECRET, inner)
    assert redact_text(f"{SECRET} {inner}", secrets) == f"{REDACTED} {REDACTED}"


def test_short_and_unset_values_are_not_secrets_to_mask():
    env = {"A": "1", "B": "abc", "C": "abcd", ENV_PASS_ENV: "A,B,C,UNSET"}
    assert secret_values(["A", "B", "C", "UNSET"], env) == ("abcd",)
    assert passed_secrets(env) == ("abcd",)
    assert passed_secrets({"C": "abcd"}) == ()  # names only from ENV_PASS_ENV


def test_the_rank_redacts_its_error_record_before_cutting_it():
    message = "y" * (4000 - 5) + SECRET
    try:
        raise ValueError(message)
    except ValueError as exc:
        record = exception_record(exc, rank=0, time=0.0, pid=1, secrets=(SECRET,))
    text = json.dumps(record)
    assert SECRET[:MIN_SECRET_CHARS] not in text
    assert record["message"].endswith(REDACTED[:5]) and REDACTED in record["traceback"]


def _masked(pieces: list[bytes], secrets: list[bytes]) -> bytes:
    masker = StreamMasker(secrets)
    return b"".join(masker.feed(p) for p in pieces) + masker.end()


def test_a_secret_split_across_any_two_writes_is_masked():
    secret = SECRET.encode()
    text = b"line one\nlogin with " + secret + b" now\n"
    want = text.replace(secret, REDACTED.encode())
    for cut in range(len(text) + 1):
        assert _masked([text[:cut], text[cut:]], [secret]) == want, cut
    assert _masked([bytes([c]) for c in text], [secret]) == want  # one byte per write


def test_random_splits_of_random_text_mask_like_one_replace():
    rng = random.Random(7)
    secrets = [b"abcab", b"bcabx", b"zzzz"]  # overlapping starts, as the hold must handle
    for _ in range(300):
        text = bytes(rng.choice(b"abcxz\n") for _ in range(rng.randrange(0, 60)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out = _masked(pieces, secrets)
        for secret in secrets:
            assert secret not in out, (text, pieces)
        # Nothing is lost or delayed past the end: only secrets (and, at the very end, a start
        # of MIN_SECRET_CHARS or more) are replaced.
        whole = StreamMasker(secrets)
        assert out == whole.feed(text) + whole.end()


def test_output_is_held_only_while_it_may_begin_a_secret():
    masker = StreamMasker([b"secret-value"])
    assert masker.feed(b"progress 10%\r") == b"progress 10%\r"  # no newline needed
    assert masker.feed(b"token=sec") == b"token="
    assert masker.feed(b"ond try\n") == b"second try\n"
    assert masker.feed(b"dying: secr") == b"dying: "
    assert masker.end() == REDACTED.encode()  # the stream ended inside it: counted as the secret
    masker.feed(b"ends with se")
    assert masker.end() == b"se"


def test_no_masker_when_nothing_is_to_be_masked(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORT_ONE", "abc")
    monkeypatch.delenv("UNSET_ONE", raising=False)
    assert MaskedOutput.start(("SHORT_ONE", "UNSET_ONE"), [str(tmp_path / "r.log")]) is None
    assert MaskedOutput.start((), [str(tmp_path / "r.log")]) is None
    assert not (tmp_path / "r.log").exists()


@pytest.mark.parametrize("value", ["ab\u00e9cd\u20ac", "with space and = sign"])
def test_non_ascii_and_odd_values_are_masked_as_bytes(value):
    secret = value.encode()
    text = f"a {value} b".encode()
    assert _masked([text[:4], text[4:]], [secret]) == f"a {REDACTED} b".encode()


def test_a_record_of_another_writer_is_redacted_at_any_depth_in_its_own_structure():
    torch_record = {
        "message": {
            "message": f"RuntimeError: token={SECRET}",
            "extraInfo": {"py_callstack": f"Traceback...\n  raise Error('{SECRET}')\n", "n": 3},
        },
        "seen": [SECRET, {f"key-{SECRET}": 1.5}, None, True],
    }
    assert redact_json(torch_record, (SECRET,)) == {
        "message": {
            "message": f"RuntimeError: token={REDACTED}",
            "extraInfo": {"py_callstack": f"Traceback...\n  raise Error('{REDACTED}')\n", "n": 3},
        },
        "seen": [REDACTED, {f"key-{REDACTED}": 1.5}, None, True],
    }
    # Texts of another writer are whole: a secret's start at an end is no cut to redact.
    assert redact_json({"timestamp": SECRET[:6]}, (SECRET,)) == {"timestamp": SECRET[:6]}


def test_seen_secrets_keep_a_value_the_environment_no_longer_has():
    env = {ENV_PASS_ENV: f"{NAME},OTHER", NAME: SECRET}
    seen = SeenSecrets()
    assert seen.look(env) == (SECRET,)
    del env[NAME]
    env["OTHER"] = "later-value"
    assert seen.look(env) == (SECRET, "later-value")


# The runtime's own hook, in a rank started without orch's entry (torchrun, a job.python of its
# own): the job reads its token, removes the variable, and fails with the token in the message.
POPPED_AFTER_INIT = """
import os
from orchestrator.runtime import install_excepthook
install_excepthook()
value = os.environ.pop({name!r})
raise RuntimeError("bad token " + value)
"""
POPPED_BEFORE_INIT = """
import os
from orchestrator.runtime import install_excepthook
value = os.environ.pop({name!r})
install_excepthook()
raise RuntimeError("bad token " + value)
"""


@pytest.mark.parametrize("code", [POPPED_AFTER_INIT, POPPED_BEFORE_INIT], ids=["after-init", "after-import"])
def test_the_runtime_redacts_a_value_the_job_removed_before_failing(tmp_path, code):
    error_file = tmp_path / "rank-0.error.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        ENV_ERROR_FILE: str(error_file),
        ENV_PASS_ENV: NAME,
        NAME: SECRET,
    }
    proc = subprocess.run(
        [sys.executable, "-c", code.format(name=NAME)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "RuntimeError: bad token" in proc.stderr  # it failed with the value
    record = json.loads(error_file.read_text())
    assert record["message"] == f"bad token {REDACTED}" and REDACTED in record["traceback"]
    assert SECRET not in error_file.read_text()
