"""Property-based: any override of any key, however wrong, is either accepted or refused
with exit status 2 and a message naming the key and a fix; never a traceback."""

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raytron.platform.cli import EXIT_CONFIG_ERROR, main
from raytron.platform.config.keys import rule_of
from raytron.platform.config.load import flatten, load_config, to_dict

LEAF_KEYS = sorted(set(flatten(to_dict(load_config("tiny")))) | {
    "faults.inject.0", "parallel.layers_per_stage.0", "cluster.worker_resources.trainer",
    "data.sources.1.path", "data.validation_sources.0.path"})

ODD = ["", " ", "''", "null", "~", "true", "false", "[]", "{}", "[1, 2]", "{a: 1}", "[a, b]",
       "0", "-1", "-0.5", "0.0", "1e308", "-1e308", "1e-300", ".inf", "-.inf", ".nan",
       "2147483648", "99999999999999999999999999", "3", "7.5", "auto", "none", "full",
       "../../x", "a/b", "..", "/", "\\x00", "é", "💥", "s3://", "a://b", "*", "[", "{",
       "'a: b'", "embedded:nope", "kill rank 9 at step 1"]

VALUES = st.one_of(
    st.sampled_from(ODD),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10).filter(lambda t: t.strip(" ./\\") != "" or t == ""),
)


@pytest.fixture(scope="module")
def in_empty_dir(tmp_path_factory):
    """Relative paths drawn as values name nothing in here."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


def run(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


@settings(max_examples=int(os.environ.get("RAYTRON_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(LEAF_KEYS), value=VALUES, command=st.sampled_from(["config", "plan"]))
@example(key="parallel.tp", value="0", command="plan")
@example(key="model.ffn_multiple_of", value="0", command="plan")
@example(key="model.n_layers", value="2147483647", command="plan")
@example(key="model.d_model", value="1048576", command="plan")
@example(key="run.name", value="../../x", command="config")
@example(key="cluster.device_memory_gb", value="1e-9", command="plan")
def test_any_override_is_accepted_or_refused_with_the_key_and_a_fix(in_empty_dir, key, value,
                                                                     command):
    code, err = run(command, "tiny", f"{key}={value}")
    assert code in (0, EXIT_CONFIG_ERROR), err
    if code == EXIT_CONFIG_ERROR:
        named = key if not key[-1].isdigit() else key.rsplit(".", 1)[0]
        assert named in err, err
        assert "Fix:" in err, err
        assert "Traceback" not in err


def test_every_leaf_key_has_a_rule():
    """A new config key cannot go unchecked: the schema declares a rule for each."""
    assert [key for key in LEAF_KEYS if rule_of(key) is None] == []
