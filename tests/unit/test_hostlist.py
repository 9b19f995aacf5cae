import pytest

from orchestrator.backends.slurm.hostlist import expand_hostlist


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-2,7],gpu[01-02]", ["n1", "n2", "n7", "gpu01", "gpu02"]),
        ("a[08-10]", ["a08", "a09", "a10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("x,y", ["x", "y"]),
    ],
)
def test_expand(text, hosts):
    assert expand_hostlist(text) == hosts


def test_bad_expression():
    with pytest.raises(ValueError):
        expand_hostlist("n[1-")
