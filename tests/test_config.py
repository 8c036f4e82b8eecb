"""Unit tests of `cdc_sync.config`: the TOML contract, its defaults and every error message."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
import pytest

from cdc_sync import config
from cdc_sync.config import (
    ResolvedPolicy,
    Settings,
    format_key_path,
    load_merge_function,
    load_settings,
    resolve_config_path,
    settings_from_dict,
    table_matches,
)
from cdc_sync.errors import ConfigError

MINIMAL = """\
[source]
name = "washington"
dsn = "postgresql://user@host:5432/db"

[[sites]]
name = "berlin"
dsn = "postgresql://user@host:5432/berlin"
"""

FULL = """\
[source]
name = "washington"
dsn = "postgresql://user:hunter2@host:5432/db"
slot = "my_slot"
publication = "my_pub"
tables = ["public.*", "audit.events"]
max_retained_bytes = 2048
forward_origins = true
heartbeat_seconds = 2.5

[[sites]]
name = "berlin"
dsn = "host=berlin dbname=grants password=hunter2"
tables = ["public.grants"]

[[sites]]
name = "paris"
dsn = "postgresql://user@paris:5432/db"

[conflicts]
strategy = "lww"
version_column = "updated_at"
tombstone_max_age_seconds = 60
[conflicts.tables."public.grants"]
counters = ["spent"]
strategy = "merge"
merge = "package.module:function"

[outbox]
site = "paris"
retention_seconds = 3600

[[connectors]]
name = "audit"
kind = "webhook"
url = "https://example.org/hook"
secret = "${HOOK_SECRET}"
tables = ["public.*"]
batch_size = 50
timeout_seconds = 3
"""

SECRET = "hunter2"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "cdc-sync.toml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def error_of(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             environ: Mapping[str, str] | None = None) -> str:
    """The message of loading `text` as ./cdc-sync.toml; asserts it is a one-line ConfigError."""
    (tmp_path / "cdc-sync.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def data(**overrides: Any) -> dict[str, Any]:
    """A valid configuration as a dict, with top-level sections replaced."""
    base: dict[str, Any] = {
        "source": {"name": "washington", "dsn": "dbname=src"},
        "sites": [{"name": "berlin", "dsn": "dbname=berlin"},
                  {"name": "paris", "dsn": "dbname=paris"}],
    }
    base.update(overrides)
    return base


def dict_error(value: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(value, environ=environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and a full file ------------------------------------------------------------------

def test_minimal_file_gets_the_documented_defaults(write: Callable[[str], Path]) -> None:
    settings = load_settings(write(MINIMAL), environ={})
    source = settings.source
    assert source.name == "washington"
    assert source.slot == config.DEFAULT_SLOT == "cdc_sync"
    assert source.publication == config.DEFAULT_PUBLICATION == "cdc_sync"
    assert source.tables == ["public.*"]
    assert source.max_retained_bytes == config.DEFAULT_MAX_RETAINED_BYTES == 1024**3
    assert source.forward_origins is False
    assert source.heartbeat_seconds == config.DEFAULT_HEARTBEAT_SECONDS == 10.0
    assert [site.name for site in settings.sites] == ["berlin"]
    assert settings.sites[0].tables is None
    assert settings.conflicts.strategy == config.DEFAULT_STRATEGY == "source_wins"
    assert settings.conflicts.version_column is None
    assert settings.conflicts.merge is None
    assert settings.conflicts.tombstone_max_age_seconds == 7 * 24 * 3600
    assert settings.conflicts.tables == {}
    assert settings.outbox.site is None
    assert settings.outbox.retention_seconds == 7 * 24 * 3600
    assert settings.connectors == []
    assert settings.outbox_site.name == "berlin"


def test_full_file(write: Callable[[str], Path]) -> None:
    settings = load_settings(write(FULL), environ={"HOOK_SECRET": "s3"})
    assert settings.source.slot == "my_slot"
    assert settings.source.publication == "my_pub"
    assert settings.source.tables == ["public.*", "audit.events"]
    assert settings.source.max_retained_bytes == 2048
    assert settings.source.forward_origins is True
    assert settings.source.heartbeat_seconds == 2.5
    assert settings.sites[0].tables == ["public.grants"]
    assert settings.conflicts.strategy == "lww"
    assert settings.conflicts.tombstone_max_age_seconds == 60.0
    assert settings.outbox.site == "paris"
    assert settings.outbox.retention_seconds == 3600.0
    assert settings.outbox_site.name == "paris"
    (connector,) = settings.connectors
    assert connector.name == "audit"
    assert connector.kind == "webhook"
    assert connector.url == "https://example.org/hook"
    assert connector.secret == "s3"
    assert connector.batch_size == 50
    assert connector.timeout_seconds == 3.0


def test_connector_defaults() -> None:
    settings = settings_from_dict(data(connectors=[
        {"name": "a", "kind": "webhook", "url": "http://localhost:8080/"}]))
    (connector,) = settings.connectors
    assert connector.secret is None
    assert connector.tables == ["*"]
    assert connector.batch_size == config.DEFAULT_CONNECTOR_BATCH_SIZE == 500
    assert connector.timeout_seconds == config.DEFAULT_CONNECTOR_TIMEOUT_SECONDS == 10.0


def test_settings_are_frozen() -> None:
    settings = settings_from_dict(data())
    with pytest.raises(pydantic.ValidationError):
        setattr(settings.source, "slot", "other")  # noqa: B010
    with pytest.raises(pydantic.ValidationError):
        setattr(settings, "sites", [])  # noqa: B010


def test_repr_leaves_out_dsns_and_secrets() -> None:
    settings = settings_from_dict(data(
        source={"name": "w", "dsn": f"postgresql://u:{SECRET}@h/db"},
        connectors=[{"name": "a", "kind": "webhook", "url": "http://x/", "secret": SECRET}],
    ))
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


# -- path resolution and file errors -----------------------------------------------------------

def test_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(environ={}) == Path("cdc-sync.toml")
    assert resolve_config_path(environ={"CDC_SYNC_CONFIG": ""}) == Path("cdc-sync.toml")
    assert resolve_config_path(environ={"CDC_SYNC_CONFIG": "/etc/x.toml"}) == Path("/etc/x.toml")
    assert resolve_config_path("a.toml", environ={"CDC_SYNC_CONFIG": "/etc/x.toml"}) == Path(
        "a.toml")


def test_load_from_default_env_and_explicit_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cdc-sync.toml").write_text(MINIMAL)
    (tmp_path / "other.toml").write_text(MINIMAL.replace("washington", "from_env"))
    (tmp_path / "third.toml").write_text(MINIMAL.replace("washington", "explicit"))
    assert load_settings(environ={}).source.name == "washington"
    env = {"CDC_SYNC_CONFIG": str(tmp_path / "other.toml")}
    assert load_settings(environ=env).source.name == "from_env"
    assert load_settings(tmp_path / "third.toml", environ=env).source.name == "explicit"
    assert load_settings("third.toml", environ=env).source.name == "explicit"


def test_load_uses_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL.replace('"washington"', '"${SOURCE_NAME}"'))
    monkeypatch.setenv("SOURCE_NAME", "from_os")
    assert load_settings(path).source.name == "from_os"
    monkeypatch.setenv("CDC_SYNC_CONFIG", str(path))
    assert load_settings().source.name == "from_os"


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert str(info.value) == (f"config file not found: {tmp_path / 'cdc-sync.toml'} "
                               "(use -c FILE or CDC_SYNC_CONFIG)")
    with pytest.raises(ConfigError, match=r"config file not found: /nonexistent/x\.toml \("):
        load_settings(environ={"CDC_SYNC_CONFIG": "/nonexistent/x.toml"})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={})
    assert str(info.value) == f"cannot read config file {tmp_path}: it is a directory"


def test_unreadable_file(write: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(MINIMAL)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value) == f"cannot read config file {path}: permission denied"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[source]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: not valid UTF-8 \(byte 17\)$"):
        load_settings(path, environ={})


def test_toml_syntax_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of('[source]\nname = "a"\ndsn = \n', tmp_path, monkeypatch)
    assert message == "cdc-sync.toml: line 3, column 7: invalid TOML: invalid value"
    message = error_of('[source]\nname = "a"\nname = "b"\n', tmp_path, monkeypatch)
    assert message.startswith("cdc-sync.toml: line 3, column ")
    assert "invalid TOML" in message


def test_toml_error_at_end_of_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of('[source]\nname = "a', tmp_path, monkeypatch)
    assert message.startswith("cdc-sync.toml: ")
    assert "invalid TOML" in message


def test_origin_is_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "given.toml"
    path.write_text("quuxly = 1\n" + MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value) == f"{path}: quuxly: unknown key"


# -- unknown, missing and mistyped keys --------------------------------------------------------

def test_unknown_key_in_an_array_of_tables(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + '[[sites]]\nnme = "paris"\nname = "paris"\ndsn = "dbname=p"\n'
    message = error_of(text, tmp_path, monkeypatch)
    assert message == 'cdc-sync.toml: sites[1].nme: unknown key (did you mean "name"?)'


def test_unknown_keys_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert error_of(MINIMAL + "[sorce]\nname = 1\n", tmp_path, monkeypatch) == (
        'cdc-sync.toml: sorce: unknown key (did you mean "source"?)')
    assert error_of(MINIMAL + 'slots = "a"\n', tmp_path, monkeypatch) == (
        'cdc-sync.toml: sites[0].slots: unknown key')
    text = MINIMAL + '[conflicts.tables."public.grants"]\nstrateg = "lww"\n'
    assert error_of(text, tmp_path, monkeypatch) == (
        'cdc-sync.toml: conflicts.tables."public.grants".strateg: unknown key '
        '(did you mean "strategy"?)')
    text = MINIMAL + '[[connectors]]\nname = "a"\nkind = "webhook"\nurl = "http://x/"\nzzz = 1\n'
    assert error_of(text, tmp_path, monkeypatch) == "cdc-sync.toml: connectors[0].zzz: unknown key"


def test_missing_required_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace('dsn = "postgresql://user@host:5432/db"\n', "")
    assert error_of(text, tmp_path, monkeypatch) == (
        "cdc-sync.toml: source.dsn: missing required key")
    assert error_of('[[sites]]\nname = "b"\ndsn = "dbname=b"\n', tmp_path, monkeypatch) == (
        "cdc-sync.toml: source: missing required key")
    text = '[source]\nname = "a"\ndsn = "dbname=x"\n'
    assert error_of(text, tmp_path, monkeypatch) == "cdc-sync.toml: sites: missing required key"
    text = MINIMAL + '[[connectors]]\nname = "a"\nurl = "http://x/"\n'
    assert error_of(text, tmp_path, monkeypatch) == (
        "cdc-sync.toml: connectors[0].kind: missing required key")


def test_several_problems_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[source]\nslot = 1\n[[sites]]\n'
    message = error_of(text, tmp_path, monkeypatch)
    assert message.startswith("cdc-sync.toml: source.name: missing required key (and ")
    assert message.endswith(" more)")


@pytest.mark.parametrize(("line", "key", "expected"), [
    ("slot = 5", "source.slot", "expected a string"),
    ("publication = true", "source.publication", "expected a string"),
    ("tables = \"public.*\"", "source.tables", "expected an array"),
    ("tables = [1]", "source.tables[0]", "expected a string"),
    ("max_retained_bytes = 1.5", "source.max_retained_bytes", "expected an integer"),
    ("max_retained_bytes = true", "source.max_retained_bytes", "expected an integer"),
    ("max_retained_bytes = \"lots\"", "source.max_retained_bytes", "expected an integer"),
    ("forward_origins = 1", "source.forward_origins", "expected a boolean (true or false)"),
    ("forward_origins = \"maybe\"", "source.forward_origins",
     "expected a boolean (true or false)"),
    ("heartbeat_seconds = true", "source.heartbeat_seconds", "expected a number"),
    ("heartbeat_seconds = \"soon\"", "source.heartbeat_seconds", "expected a number"),
    ("heartbeat_seconds = inf", "source.heartbeat_seconds", "expected a finite number"),
    ("heartbeat_seconds = 0", "source.heartbeat_seconds", "expected a number greater than 0"),
    ("max_retained_bytes = -1", "source.max_retained_bytes", "expected a number greater than 0"),
    ("tables = []", "source.tables", "expected at least 1 item"),
    ("tables = [\"\"]", "source.tables[0]", "expected a non-empty string"),
    ("publication = \"\"", "source.publication", "expected a non-empty string"),
    ("slot = 1979-05-27", "source.slot", "expected a string"),
])
def test_wrong_types_in_source(line: str, key: str, expected: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace("[source]\n", f"[source]\n{line}\n")
    assert error_of(text, tmp_path, monkeypatch) == f"cdc-sync.toml: {key}: {expected}"


def test_wrong_shapes_of_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert error_of("conflicts = 3\n" + MINIMAL, tmp_path, monkeypatch) == (
        "cdc-sync.toml: conflicts: expected a table")
    text = MINIMAL.replace("[[sites]]", "[sites]")
    assert error_of(text, tmp_path, monkeypatch) == "cdc-sync.toml: sites: expected an array"
    assert error_of("connectors = [1]\n" + MINIMAL, tmp_path, monkeypatch) == (
        "cdc-sync.toml: connectors[0]: expected a table")


def test_literal_values() -> None:
    assert dict_error(data(conflicts={"strategy": "lwx"})) == (
        "<config>: conflicts.strategy: expected 'source_wins', 'lww', 'first_write_wins' "
        "or 'merge'")
    message = dict_error(data(connectors=[{"name": "a", "kind": "kafka", "url": "http://x/"}]))
    assert message == "<config>: connectors[0].kind: expected 'webhook'"


def test_custom_origin_and_top_level() -> None:
    with pytest.raises(ConfigError, match=r"^mine: sites: expected at least 1 item$"):
        settings_from_dict(data(sites=[]), origin="mine", environ={})
    with pytest.raises(ConfigError, match=r"^<config>: expected a table at the top level$"):
        settings_from_dict([], environ={})  # type: ignore[arg-type]


# -- value checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("slot", ["Upper", "with-dash", "x" * 64, ""])
def test_slot_names(slot: str) -> None:
    message = dict_error(data(source={"name": "w", "dsn": "dbname=x", "slot": slot}))
    assert message.startswith("<config>: source.slot: expected a replication slot name")


def test_slot_name_of_63_characters_is_fine() -> None:
    settings = settings_from_dict(data(source={"name": "w", "dsn": "dbname=x", "slot": "a" * 63}))
    assert settings.source.slot == "a" * 63


def test_source_name_may_not_contain_a_slash() -> None:
    assert dict_error(data(source={"name": "a/b", "dsn": "dbname=x"})) == (
        '<config>: source.name: must not contain "/"')


def test_invalid_dsn_is_not_echoed() -> None:
    bad = f"host=h password={SECRET} nonsense"
    message = dict_error(data(source={"name": "w", "dsn": bad}))
    assert message == ("<config>: source.dsn: not a valid PostgreSQL connection string "
                       "(URL or key=value)")
    message = dict_error(data(sites=[{"name": "b", "dsn": f"postgresql://u:{SECRET}@h/db?bogus=1"}]))
    assert message.startswith("<config>: sites[0].dsn: not a valid PostgreSQL connection")
    assert SECRET not in message


def test_empty_dsn() -> None:
    assert dict_error(data(source={"name": "w", "dsn": ""})) == (
        "<config>: source.dsn: expected a non-empty string")


def test_connector_url_must_be_http() -> None:
    message = dict_error(data(connectors=[{"name": "a", "kind": "webhook", "url": "ftp://x"}]))
    assert message == "<config>: connectors[0].url: expected an http:// or https:// URL"


def test_site_names_are_unique() -> None:
    sites = [{"name": "b", "dsn": "dbname=1"}, {"name": "p", "dsn": "dbname=2"},
             {"name": "b", "dsn": "dbname=3"}]
    assert dict_error(data(sites=sites)) == '<config>: sites[2].name: duplicate site name "b"'


def test_connector_names_are_unique() -> None:
    hook = {"name": "a", "kind": "webhook", "url": "http://x/"}
    assert dict_error(data(connectors=[hook, hook])) == (
        '<config>: connectors[1].name: duplicate connector name "a"')


def test_outbox_site_must_name_a_site() -> None:
    assert dict_error(data(outbox={"site": "rome"})) == (
        '<config>: outbox.site: no site named "rome" (sites: berlin, paris)')


def test_outbox_site_and_site_lookup() -> None:
    settings = settings_from_dict(data(outbox={"site": "paris"}))
    assert settings.outbox_site.name == "paris"
    assert settings.site("berlin").dsn == "dbname=berlin"
    with pytest.raises(ConfigError, match=r'^no site named "rome" \(sites: berlin, paris\)$'):
        settings.site("rome")


# -- conflicts: merge references and per-table policies -----------------------------------------

def test_merge_strategy_needs_a_reference() -> None:
    assert dict_error(data(conflicts={"strategy": "merge"})) == (
        '<config>: conflicts.merge: strategy "merge" needs merge = "package.module:function"')
    tables = {"public.grants": {"strategy": "merge"}}
    assert dict_error(data(conflicts={"tables": tables})) == (
        '<config>: conflicts.tables."public.grants".merge: strategy "merge" needs '
        'merge = "package.module:function"')


def test_table_merge_may_come_from_the_defaults() -> None:
    settings = settings_from_dict(data(conflicts={
        "merge": "pkg.mod:fn", "tables": {"public.grants": {"strategy": "merge"}}}))
    policy = settings.conflicts.for_table("public.grants")
    assert policy.strategy == "merge"
    assert policy.merge == "pkg.mod:fn"
    assert policy.merge_key == "conflicts.merge"


@pytest.mark.parametrize("ref", ["pkg.mod", "pkg.mod:", ":fn", "pkg..mod:fn", "pkg mod:fn",
                                 "pkg.mod:fn()", "1pkg:fn"])
def test_merge_reference_shape(ref: str) -> None:
    assert dict_error(data(conflicts={"merge": ref})) == (
        '<config>: conflicts.merge: expected "package.module:function"')
    message = dict_error(data(conflicts={"tables": {"s.t": {"merge": ref}}}))
    assert message == '<config>: conflicts.tables."s.t".merge: expected "package.module:function"'


def test_conflict_table_keys_are_qualified() -> None:
    assert dict_error(data(conflicts={"tables": {"grants": {}}})) == (
        '<config>: conflicts.tables.grants: expected a qualified table name "schema.table"')


def test_for_table_merges_the_override_over_the_defaults() -> None:
    settings = settings_from_dict(data(conflicts={
        "strategy": "lww",
        "version_column": "updated_at",
        "tombstone_max_age_seconds": 120,
        "tables": {
            "public.grants": {"counters": ["spent", "granted"]},
            "public.budgets": {"strategy": "first_write_wins", "version_column": "rev"},
            "public.notes": {"strategy": "merge", "merge": "notes.merging:combine"},
        },
    }))
    conflicts = settings.conflicts
    assert conflicts.for_table("public.other") == ResolvedPolicy(
        table="public.other", strategy="lww", version_column="updated_at", counters=(),
        merge=None, merge_key=None, tombstone_max_age_seconds=120.0)
    grants = conflicts.for_table("public.grants")
    assert (grants.strategy, grants.version_column, grants.counters) == (
        "lww", "updated_at", ("spent", "granted"))
    budgets = conflicts.for_table("public.budgets")
    assert (budgets.strategy, budgets.version_column, budgets.counters) == (
        "first_write_wins", "rev", ())
    notes = conflicts.for_table("public.notes")
    assert (notes.strategy, notes.merge, notes.merge_key) == (
        "merge", "notes.merging:combine", 'conflicts.tables."public.notes".merge')
    assert notes.tombstone_max_age_seconds == 120.0
    # Table names are exact and case-sensitive: no override for another spelling.
    assert conflicts.for_table("public.Grants").counters == ()


def test_default_policy_is_source_wins() -> None:
    policy = settings_from_dict(data()).conflicts.for_table("public.x")
    assert policy.strategy == "source_wins"
    assert policy.version_column is None


@pytest.fixture
def merge_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "cdc_sync_test_merges"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""\
        def combine(local, incoming):
            return {**local, **incoming}

        class Holder:
            @staticmethod
            def method(local, incoming):
                return local

        NOT_CALLABLE = 3
    """))
    (tmp_path / "cdc_sync_test_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, "cdc_sync_test_broken"):
        sys.modules.pop(module, None)


def test_load_merge_function(merge_module: str) -> None:
    combine = load_merge_function(f"{merge_module}:combine")
    assert combine({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}
    assert load_merge_function(f"{merge_module}:Holder.method")({"x": 1}, {}) == {"x": 1}


def test_load_merge_function_errors_name_the_key(merge_module: str) -> None:
    key = 'conflicts.tables."public.notes".merge'
    with pytest.raises(ConfigError) as info:
        load_merge_function("no_such_package_xyz.mod:fn", key=key)
    assert str(info.value) == (f"{key}: cannot import no_such_package_xyz.mod: "
                               "No module named 'no_such_package_xyz'")
    with pytest.raises(ConfigError, match=rf"^conflicts\.merge: {merge_module} has no attribute"):
        load_merge_function(f"{merge_module}:missing")
    with pytest.raises(ConfigError, match=r"is not callable$"):
        load_merge_function(f"{merge_module}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match=r"^conflicts\.merge: importing cdc_sync_test_broken "
                                          r"failed: RuntimeError: boom at import$"):
        load_merge_function("cdc_sync_test_broken:fn")
    with pytest.raises(ConfigError, match=r'^k: expected "package\.module:function"$'):
        load_merge_function("not a reference", key="k")


def test_policy_load_merge(merge_module: str) -> None:
    settings = settings_from_dict(data(conflicts={"tables": {
        "public.notes": {"strategy": "merge", "merge": f"{merge_module}:combine"},
        "public.bad": {"strategy": "merge", "merge": f"{merge_module}:absent"},
    }}))
    assert settings.conflicts.for_table("public.notes").load_merge()({}, {"a": 1}) == {"a": 1}
    with pytest.raises(ConfigError, match=r'^conflicts\.tables\."public\.bad"\.merge: '):
        settings.conflicts.for_table("public.bad").load_merge()
    with pytest.raises(ConfigError, match="has no merge function"):
        settings.conflicts.for_table("public.other").load_merge()


# -- ${NAME} substitution ----------------------------------------------------------------------

def test_missing_variable_names_it_and_the_key(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + ('[[connectors]]\nname = "audit"\nkind = "webhook"\n'
                      'url = "https://example.org/hook"\nsecret = "${HOOK_SECRET}"\n')
    assert error_of(text, tmp_path, monkeypatch) == (
        "cdc-sync.toml: connectors[0].secret: environment variable HOOK_SECRET is not set")


def test_substitution_everywhere() -> None:
    env = {"USER": "alice", "PW": SECRET, "PORT": "5433", "T": "grants", "HB": "2.5",
           "N": " 25 ", "FWD": "true", "HOST": "db.example"}
    settings = settings_from_dict({
        "source": {"name": "src_${USER}", "dsn": "postgresql://${USER}:${PW}@${HOST}:${PORT}/db",
                   "tables": ["public.${T}", "audit.*"], "heartbeat_seconds": "${HB}",
                   "forward_origins": "${FWD}", "max_retained_bytes": "${N}"},
        "sites": [{"name": "b", "dsn": "host=${HOST} password=${PW}"}],
        "conflicts": {"tables": {"public.${T}": {"counters": ["${T}_spent"]}}},
        "connectors": [{"name": "a", "kind": "webhook", "url": "https://${HOST}/",
                        "batch_size": "${N}"}],
    }, environ=env)
    assert settings.source.name == "src_alice"
    assert settings.source.dsn == f"postgresql://alice:{SECRET}@db.example:5433/db"
    assert settings.source.tables == ["public.grants", "audit.*"]
    assert settings.source.heartbeat_seconds == 2.5
    assert settings.source.forward_origins is True
    assert settings.source.max_retained_bytes == 25
    assert settings.sites[0].dsn == f"host=db.example password={SECRET}"
    # keys are not substituted, values inside them are
    assert settings.conflicts.tables["public.${T}"].counters == ["grants_spent"]
    assert settings.connectors[0].url == "https://db.example/"
    assert settings.connectors[0].batch_size == 25


def test_substituted_value_is_still_validated() -> None:
    message = dict_error(data(connectors=[{"name": "a", "kind": "webhook", "url": "http://x/",
                                           "batch_size": "${N}"}]), environ={"N": "many"})
    assert message == "<config>: connectors[0].batch_size: expected an integer"


def test_escape_and_malformed_references() -> None:
    settings = settings_from_dict(data(source={"name": "w", "dsn": "dbname=x",
                                               "publication": "p$${NOT_A_VAR}$x"}), environ={})
    assert settings.source.publication == "p${NOT_A_VAR}$x"
    assert dict_error(data(source={"name": "${1BAD}", "dsn": "dbname=x"})) == (
        "<config>: source.name: malformed ${NAME} reference (write $${ for a literal ${)")
    assert dict_error(data(source={"name": "${OPEN", "dsn": "dbname=x"})).startswith(
        "<config>: source.name: malformed ${NAME} reference")


def test_missing_variable_in_nested_places() -> None:
    message = dict_error(data(sites=[{"name": "b", "dsn": "dbname=b", "tables": ["a.b", "${X}"]}]))
    assert message == "<config>: sites[0].tables[1]: environment variable X is not set"
    message = dict_error(data(conflicts={"tables": {"public.g": {"merge": "${M}"}}}))
    assert message == ('<config>: conflicts.tables."public.g".merge: '
                       "environment variable M is not set")


def test_empty_variable_counts_as_set() -> None:
    assert dict_error(data(source={"name": "${EMPTY}", "dsn": "dbname=x"}),
                      environ={"EMPTY": ""}) == (
        "<config>: source.name: expected a non-empty string")


# -- passwords never appear ------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    # an invalid DSN that carries the password
    MINIMAL.replace('"postgresql://user@host:5432/db"',
                    f'"postgresql://user:{SECRET}@host/db?bogus=1"'),
    MINIMAL.replace('"postgresql://user@host:5432/db"', f'"host=h password={SECRET} junk"'),
    # a password in a key that does not exist
    MINIMAL + f'[outbox]\ndsn = "postgresql://u:{SECRET}@h/db"\n',
    # a password given to a key of the wrong type
    MINIMAL.replace("[source]\n", f'[source]\nheartbeat_seconds = "postgresql://u:{SECRET}@h"\n'),
    MINIMAL.replace("[source]\n", f'[source]\nslot = "postgresql://u:{SECRET}@h"\n'),
    MINIMAL.replace("[source]\n", f'[source]\nforward_origins = "{SECRET}"\n'),
    # a secret next to a broken connector
    MINIMAL + f'[[connectors]]\nname = "a"\nkind = "web"\nurl = "x"\nsecret = "{SECRET}"\n',
    # a password through the environment, where the site is invalid
    MINIMAL + '[[sites]]\nname = "berlin"\ndsn = "postgresql://u:${PW}@h/db"\n',
    MINIMAL + '[[sites]]\nname = "p"\ndsn = "host=h password=${PW} junk"\n',
    # a password in a TOML syntax error's line
    MINIMAL.replace('"postgresql://user@host:5432/db"',
                    f'"postgresql://user:{SECRET}@host:5432/db'),
])
def test_passwords_never_appear(text: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(text, tmp_path, monkeypatch, environ={"PW": SECRET})
    assert SECRET not in message


# -- helpers -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("patterns", "qualified", "expected"), [
    (["public.*"], "public.grants", True),
    (["public.*"], "audit.grants", False),
    (["public.*"], "Public.grants", False),
    (["public.Grants"], "public.grants", False),
    (["*"], "any.thing", True),
    (["public.g?ants"], "public.grants", True),
    (["public.[gb]*"], "public.budgets", True),
    (["audit.*", "public.grants"], "public.grants", True),
    ([], "public.grants", False),
    ("public.*", "public.grants", True),
])
def test_table_matches(patterns: list[str], qualified: str, expected: bool) -> None:
    assert table_matches(patterns, qualified) is expected


def test_format_key_path() -> None:
    assert format_key_path(("sites", 1, "name")) == "sites[1].name"
    assert format_key_path(("conflicts", "tables", "public.grants", "merge")) == (
        'conflicts.tables."public.grants".merge')
    assert format_key_path(("connectors", 0)) == "connectors[0]"
    assert format_key_path(()) == ""


def test_settings_can_be_built_directly() -> None:
    settings = Settings(source=config.SourceSettings(name="w", dsn="dbname=x"),
                        sites=[config.SiteSettings(name="b", dsn="dbname=b")])
    assert settings.outbox_site.name == "b"
    with pytest.raises(pydantic.ValidationError):
        Settings(source=config.SourceSettings(name="w", dsn="dbname=x"), sites=[])


# -- streaming of in-progress transactions ----------------------------------------------------

def test_streaming_defaults_to_on_with_8mb() -> None:
    source = settings_from_dict(data()).source
    assert source.streaming is True and config.DEFAULT_STREAMING is True
    assert source.decoding_work_mem == config.DEFAULT_DECODING_WORK_MEM == "8MB"


def test_streaming_can_be_turned_off(write: Callable[[str], Path]) -> None:
    assert settings_from_dict(data(source={"name": "w", "dsn": "dbname=x", "streaming": False})
                              ).source.streaming is False
    text = MINIMAL.replace('dsn = "postgresql://user@host:5432/db"\n',
                           'dsn = "postgresql://user@host:5432/db"\nstreaming = false\n'
                           'decoding_work_mem = "64kB"\n', 1)
    source = load_settings(write(text), environ={}).source
    assert source.streaming is False and source.decoding_work_mem == "64kB"
    # As every boolean, it may come from the environment.
    source = settings_from_dict(data(source={"name": "w", "dsn": "dbname=x",
                                             "streaming": "${STREAM}"}),
                                environ={"STREAM": "false"}).source
    assert source.streaming is False
    assert dict_error(data(source={"name": "w", "dsn": "dbname=x", "streaming": "maybe"})) \
        .startswith("<config>: source.streaming: ")


@pytest.mark.parametrize("size", ["64kB", "8MB", "1GB", "512kB", "64GB"])
def test_decoding_work_mem_accepts_sizes(size: str) -> None:
    source = settings_from_dict(data(source={"name": "w", "dsn": "dbname=x",
                                             "decoding_work_mem": size})).source
    assert source.decoding_work_mem == size


@pytest.mark.parametrize("size, why", [
    ("8mb", "expected a size"), ("0MB", "expected a size"), ("32kB", "between 64kB and 64GB"),
    ("100GB", "between 64kB and 64GB"), ("8", "expected a size"), ("8 MB", "expected a size"),
    ("", "expected a size"), ("65GB", "between 64kB and 64GB"),
])
def test_decoding_work_mem_rejects_bad_sizes(size: str, why: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    message = dict_error(data(source={"name": "w", "dsn": "dbname=x",
                                      "decoding_work_mem": size}))
    assert message.startswith("<config>: source.decoding_work_mem: "), message
    assert why in message
    text = MINIMAL.replace('dsn = "postgresql://user@host:5432/db"\n',
                           f'dsn = "postgresql://user@host:5432/db"\ndecoding_work_mem = "{size}"\n',
                           1)
    message = error_of(text, tmp_path, monkeypatch)
    assert message.startswith("cdc-sync.toml: source.decoding_work_mem: "), message
