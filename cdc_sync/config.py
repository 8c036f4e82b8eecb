"""Configuration: one frozen `Settings` object, built in one place.

Contract (the TOML keys are the ones in ARCHITECTURE.md; they are a public interface):

- `load_settings(path)` reads the file named by `path`, else by `$CDC_SYNC_CONFIG`, else
  `./cdc-sync.toml`; `settings_from_dict(data)` does the same for data already in memory.
- Every string value anywhere may contain `${NAME}` references, substituted from the environment
  before validation; `$${` stands for a literal `${`. A string is accepted (and parsed) where a
  number or boolean is expected, so `batch_size = "${BATCH}"` works; otherwise types are strict
  (`heartbeat_seconds = true` is an error, not 1.0).
- Every problem is a `ConfigError` whose message is one line `<file>: <key path>: <what>`, e.g.
  `cdc-sync.toml: sites[1].nme: unknown key`. No message echoes an input value other than a site
  or connector name (so no password, whatever key it was put in), the models leave `dsn` and
  `secret` out of their repr, and every message goes through `mask_dsn` besides. With several
  problems the first is named and the rest counted: `... (and 2 more)`.
- All models are frozen and reject unknown keys. Defaults are the `DEFAULT_*` constants below.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from cdc_sync.errors import ConfigError, mask_dsn

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_FILE",
    "BusSettings",
    "ConflictSettings",
    "ConflictTableSettings",
    "ConnectorSettings",
    "OutboxSettings",
    "ResolvedPolicy",
    "Settings",
    "SiteSettings",
    "SourceSettings",
    "Strategy",
    "format_key_path",
    "load_merge_function",
    "load_settings",
    "resolve_config_path",
    "settings_from_dict",
    "table_matches",
]

CONFIG_ENV_VAR = "CDC_SYNC_CONFIG"
DEFAULT_CONFIG_FILE = "cdc-sync.toml"

DEFAULT_SLOT = "cdc_sync"
DEFAULT_PUBLICATION = "cdc_sync"
DEFAULT_SOURCE_TABLES: tuple[str, ...] = ("public.*",)
DEFAULT_MAX_RETAINED_BYTES = 1 << 30  # 1 GiB of WAL held back by the slot
DEFAULT_FORWARD_ORIGINS = False
DEFAULT_HEARTBEAT_SECONDS = 10.0
DEFAULT_STREAMING = True
DEFAULT_DECODING_WORK_MEM = "8MB"

Strategy = Literal["source_wins", "lww", "first_write_wins", "merge"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DEFAULT_STRATEGY: Strategy = "source_wins"
DEFAULT_TOMBSTONE_MAX_AGE_SECONDS = 7 * 24 * 3600.0

DEFAULT_OUTBOX_RETENTION_SECONDS = 7 * 24 * 3600.0

DEFAULT_CONNECTOR_TABLES: tuple[str, ...] = ("*",)
DEFAULT_CONNECTOR_BATCH_SIZE = 500
DEFAULT_CONNECTOR_TIMEOUT_SECONDS = 10.0

# https://www.postgresql.org/docs/15/functions-admin.html#FUNCTIONS-REPLICATION: slot names
# "may only contain lower case letters, numbers, and the underscore character"; NAMEDATALEN-1.
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_MEMORY = re.compile(r"([1-9][0-9]{0,9})(kB|MB|GB)")
_MERGE_REF = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_MERGE_SHAPE = 'expected "package.module:function"'
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_TOML_POSITION = re.compile(r"^(?P<what>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|"
                            r"(?P<end>end of document))\)$", re.DOTALL)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# Our own validation errors: the message is final; ctx["at"] extends the location.
_ERROR_TYPE = "cdc_sync_config"

Loc = tuple[str | int, ...]


def _invalid(message: str, *at: str | int) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_TYPE, message, {"at": at})


# -- strict scalars that still accept a string from ${NAME} substitution -----------------------

def _parse_int(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value  # strict validation then reports "expected an integer"
    return value


def _parse_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _parse_bool(value: Any) -> Any:
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value


_Int = Annotated[int, Field(strict=True), BeforeValidator(_parse_int)]
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False), BeforeValidator(_parse_float)]
_Bool = Annotated[bool, Field(strict=True), BeforeValidator(_parse_bool)]
_Text = Annotated[str, Field(min_length=1)]
_Patterns = Annotated[list[_Text], Field(min_length=1)]


def _check_dsn(value: str) -> str:
    try:
        conninfo_to_dict(value)
    except psycopg.Error:
        # psycopg's message quotes the input, which may hold a password: say only what's wrong.
        raise _invalid("not a valid PostgreSQL connection string (URL or key=value)") from None
    return value


_Dsn = Annotated[str, Field(min_length=1, repr=False)]


# Default factories are lambdas, not `list`, `dict` or a model class: pydantic reads each
# factory's signature when it builds the class, and for those that costs ~3 ms of every start.
class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- the models --------------------------------------------------------------------------------

class SourceSettings(_Model):
    """`[source]`: the database whose changes are captured."""

    name: _Text
    dsn: _Dsn
    slot: str = DEFAULT_SLOT
    publication: _Text = DEFAULT_PUBLICATION
    tables: _Patterns = Field(default_factory=lambda: list(DEFAULT_SOURCE_TABLES))
    max_retained_bytes: _Int = Field(default=DEFAULT_MAX_RETAINED_BYTES, gt=0)
    forward_origins: _Bool = DEFAULT_FORWARD_ORIGINS
    heartbeat_seconds: _Float = Field(default=DEFAULT_HEARTBEAT_SECONDS, gt=0)
    # Large transactions are streamed while still in progress (PostgreSQL 14+) and applied as
    # they arrive, once the server's decoding buffer (logical_decoding_work_mem for our
    # session) holds more than `decoding_work_mem` of changes.
    streaming: _Bool = DEFAULT_STREAMING
    decoding_work_mem: str = DEFAULT_DECODING_WORK_MEM

    @field_validator("decoding_work_mem")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        match = _MEMORY.fullmatch(value)
        if not match:
            raise _invalid('expected a size such as "8MB" (a number, then kB, MB or GB)')
        n, unit = int(match[1]), match[2]
        kb = n * {"kB": 1, "MB": 1024, "GB": 1024 * 1024}[unit]
        if not 64 <= kb <= 64 * 1024 * 1024:
            raise _invalid("must be between 64kB and 64GB")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if "/" in value:  # event ids are "<source>/<lsn>/<n>"
            raise _invalid('must not contain "/"')
        return value

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, value: str) -> str:
        return _check_dsn(value)

    @field_validator("slot")
    @classmethod
    def _check_slot(cls, value: str) -> str:
        if not _SLOT_NAME.fullmatch(value):
            raise _invalid("expected a replication slot name: 1 to 63 lowercase letters, "
                           "digits and underscores")
        return value


class SiteSettings(_Model):
    """`[[sites]]`: a database the changes are applied to."""

    name: _Text
    dsn: _Dsn
    tables: _Patterns | None = None  # None: every table of the source

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, value: str) -> str:
        return _check_dsn(value)


def _check_merge_ref(value: str | None) -> str | None:
    if value is not None and not _MERGE_REF.fullmatch(value):
        raise _invalid(_MERGE_SHAPE)
    return value


class ConflictTableSettings(_Model):
    """`[conflicts.tables."schema.table"]`: overrides of the conflict defaults for one table."""

    strategy: Strategy | None = None
    version_column: _Text | None = None
    counters: list[_Text] = Field(default_factory=lambda: [])
    merge: str | None = None
    merge_columns: _Bool | None = None

    @field_validator("merge")
    @classmethod
    def _check_merge(cls, value: str | None) -> str | None:
        return _check_merge_ref(value)


def local_rows_needed(strategy: str, counters: Sequence[str]) -> bool:
    """The one rule for which policies read the site's row before writing: all but plain
    `source_wins` (which overwrites whatever is there). Those policies go through the resolving
    path, and local deletes leave tombstones for them."""
    return not (strategy == "source_wins" and not counters)


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """The conflict policy of one table: its override merged over the `[conflicts]` defaults."""

    table: str
    strategy: Strategy
    version_column: str | None  # None: compare source commit timestamps
    counters: tuple[str, ...]
    merge: str | None
    merge_key: str | None  # the key that set `merge`, for error messages
    tombstone_max_age_seconds: float
    merge_columns: bool = False  # per-column last-writer-wins (strategy lww, commit time)

    @property
    def needs_local_rows(self) -> bool:
        """Whether applying a change needs the site's row first (`local_rows_needed`)."""
        return local_rows_needed(self.strategy, self.counters)

    def load_merge(self) -> Callable[..., Any]:
        """Import this policy's merge function; `ConfigError` naming the key if that fails."""
        if self.merge is None:
            raise ConfigError(f"conflicts: table {self.table} has no merge function")
        return load_merge_function(self.merge, key=self.merge_key or "conflicts.merge")


class ConflictSettings(_Model):
    """`[conflicts]`: defaults for every table plus per-table overrides."""

    strategy: Strategy = DEFAULT_STRATEGY
    version_column: _Text | None = None
    merge: str | None = None
    merge_columns: _Bool = False
    tombstone_max_age_seconds: _Float = Field(default=DEFAULT_TOMBSTONE_MAX_AGE_SECONDS, gt=0)
    tables: dict[str, ConflictTableSettings] = Field(default_factory=lambda: {})

    @field_validator("merge")
    @classmethod
    def _check_merge(cls, value: str | None) -> str | None:
        return _check_merge_ref(value)

    @model_validator(mode="after")
    def _check_merge_present(self) -> ConflictSettings:
        need = 'strategy "merge" needs merge = "package.module:function"'
        if self.strategy == "merge" and self.merge is None:
            raise _invalid(need, "merge")
        columns_need = ('merge_columns needs strategy = "lww" and no version_column '
                        "(each column is ordered by commit time)")
        if self.merge_columns and (self.strategy != "lww" or self.version_column):
            raise _invalid(columns_need, "merge_columns")
        for name, table in self.tables.items():
            if "." not in name.strip("."):
                raise _invalid('expected a qualified table name "schema.table"', "tables", name)
            strategy = table.strategy or self.strategy
            if strategy == "merge" and (table.merge or self.merge) is None:
                raise _invalid(need, "tables", name, "merge")
            columns = self.merge_columns if table.merge_columns is None else table.merge_columns
            if columns and (strategy != "lww"
                            or (table.version_column or self.version_column)):
                raise _invalid(columns_need, "tables", name, "merge_columns")
        return self

    def for_table(self, qualified: str) -> ResolvedPolicy:
        """The policy of `qualified` ("schema.table"): its override, else the defaults."""
        override = self.tables.get(qualified)
        if override is None:
            return ResolvedPolicy(
                table=qualified,
                strategy=self.strategy,
                version_column=self.version_column,
                counters=(),
                merge=self.merge,
                merge_key="conflicts.merge" if self.merge is not None else None,
                tombstone_max_age_seconds=self.tombstone_max_age_seconds,
                merge_columns=self.merge_columns,
            )
        if override.merge is not None:
            merge, merge_key = override.merge, format_key_path(
                ("conflicts", "tables", qualified, "merge"))
        elif self.merge is not None:
            merge, merge_key = self.merge, "conflicts.merge"
        else:
            merge, merge_key = None, None
        return ResolvedPolicy(
            table=qualified,
            strategy=override.strategy or self.strategy,
            version_column=override.version_column or self.version_column,
            counters=tuple(override.counters),
            merge=merge,
            merge_key=merge_key,
            tombstone_max_age_seconds=self.tombstone_max_age_seconds,
            merge_columns=(self.merge_columns if override.merge_columns is None
                           else override.merge_columns),
        )


class OutboxSettings(_Model):
    """`[outbox]`: where the outbound connector table lives."""

    site: _Text | None = None  # None: the first site
    retention_seconds: _Float = Field(default=DEFAULT_OUTBOX_RETENTION_SECONDS, gt=0)


class ConnectorSettings(_Model):
    """`[[connectors]]`: a delivery from the outbound table to the outside."""

    name: _Text
    kind: Literal["webhook"]
    url: _Text
    secret: str | None = Field(default=None, repr=False)
    tables: _Patterns = Field(default_factory=lambda: list(DEFAULT_CONNECTOR_TABLES))
    batch_size: _Int = Field(default=DEFAULT_CONNECTOR_BATCH_SIZE, gt=0)
    timeout_seconds: _Float = Field(default=DEFAULT_CONNECTOR_TIMEOUT_SECONDS, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.lower().startswith(("http://", "https://")):
            raise _invalid("expected an http:// or https:// URL")
        return value


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")


class BusSettings(_Model):
    """`[bus]`: a NATS JetStream stream between capture and the appliers (`cdc_sync.bus`)."""

    kind: Literal["nats"]
    url: _Text | Annotated[list[_Text], Field(min_length=1)]
    stream: str | None = None  # None: "CDC_" + the source name, upper-cased (`stream_for`)
    creds_file: _Text | None = None
    token: str | None = Field(default=None, repr=False)
    user: _Text | None = None
    password: str | None = Field(default=None, repr=False)
    tls_ca_file: _Text | None = None
    replicas: _Int = Field(default=1, ge=1, le=5)
    max_bytes: _Int = Field(default=-1, ge=-1)  # -1: no limit
    max_age_seconds: _Float = Field(default=0, ge=0)  # 0: no limit

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: str | None) -> str | None:
        if value is not None and not _STREAM_NAME.fullmatch(value):
            raise _invalid("expected a JetStream stream name: letters, digits, _ and -")
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> BusSettings:
        if (self.user is None) != (self.password is None):
            raise _invalid("user and password go together", "user")
        if sum(x is not None for x in (self.creds_file, self.token, self.user)) > 1:
            raise _invalid("choose one of creds_file, token, user + password", "token")
        return self

    @property
    def servers(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    def stream_for(self, source: str) -> str:
        """The stream's name: `stream`, else "CDC_" + `source` upper-cased (characters a
        stream name cannot hold become "_")."""
        if self.stream is not None:
            return self.stream
        return "CDC_" + re.sub(r"[^A-Za-z0-9_-]", "_", source.upper())


class Settings(_Model):
    """The whole configuration file."""

    source: SourceSettings
    sites: Annotated[list[SiteSettings], Field(min_length=1)]
    conflicts: ConflictSettings = Field(default_factory=lambda: ConflictSettings())
    outbox: OutboxSettings = Field(default_factory=lambda: OutboxSettings())
    connectors: list[ConnectorSettings] = Field(default_factory=lambda: [])
    bus: BusSettings | None = None  # None: one process holds the slot and every site

    @model_validator(mode="after")
    def _check_names(self) -> Settings:
        seen: set[str] = set()
        for i, site in enumerate(self.sites):
            if site.name in seen:
                raise _invalid(f'duplicate site name "{site.name}"', "sites", i, "name")
            seen.add(site.name)
        if self.outbox.site is not None and self.outbox.site not in seen:
            names = ", ".join(site.name for site in self.sites)
            raise _invalid(f'no site named "{self.outbox.site}" (sites: {names})',
                           "outbox", "site")
        connectors: set[str] = set()
        for i, connector in enumerate(self.connectors):
            if connector.name in connectors:
                raise _invalid(f'duplicate connector name "{connector.name}"',
                               "connectors", i, "name")
            connectors.add(connector.name)
        return self

    def site(self, name: str) -> SiteSettings:
        """The site called `name`; `ConfigError` listing the sites if there is none."""
        for site in self.sites:
            if site.name == name:
                return site
        names = ", ".join(site.name for site in self.sites)
        raise ConfigError(f'no site named "{name}" (sites: {names})')

    @property
    def outbox_site(self) -> SiteSettings:
        """The site holding the outbound connector table: `outbox.site`, else the first."""
        if self.outbox.site is None:
            return self.sites[0]
        return self.site(self.outbox.site)


# -- helpers -----------------------------------------------------------------------------------

def table_matches(patterns: Sequence[str], qualified: str) -> bool:
    """Whether "schema.table" matches any of the fnmatch-style `patterns` (case-sensitive)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(qualified, pattern) for pattern in patterns)


def load_merge_function(ref: str, *, key: str = "conflicts.merge") -> Callable[..., Any]:
    """Import "package.module:function"; a failure is a `ConfigError` naming `key`."""
    if not _MERGE_REF.fullmatch(ref):
        raise ConfigError(f"{key}: {_MERGE_SHAPE}")
    module_name, _, attribute = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name}: {exc}") from exc
    except Exception as exc:  # the module itself failed: still a configuration problem
        raise ConfigError(
            f"{key}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(f"{key}: {module_name} has no attribute {attribute}") from exc
    if not callable(target):
        raise ConfigError(f"{key}: {ref} is not callable")
    return target  # type: ignore[no-any-return]


def format_key_path(loc: Loc) -> str:
    """`("sites", 1, "name")` as `sites[1].name`; keys that are not bare are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE_KEY.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
        out += f".{text}" if out else text
    return out


def resolve_config_path(path: str | Path | None = None, *,
                        environ: Mapping[str, str] | None = None) -> Path:
    """`path`, else `$CDC_SYNC_CONFIG`, else `./cdc-sync.toml`."""
    env = os.environ if environ is None else environ
    if path is None or str(path) == "":
        path = env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE
    return Path(path).expanduser()


def load_settings(path: str | Path | None = None, *,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read, substitute and validate the configuration file; `ConfigError` on any problem."""
    env = os.environ if environ is None else environ
    file = resolve_config_path(path, environ=env)
    where = file.absolute()
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {where} "
                          f"(use -c FILE or {CONFIG_ENV_VAR})") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"cannot read config file {where}: it is a directory") from exc
    except PermissionError as exc:
        raise ConfigError(f"cannot read config file {where}: permission denied") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {where}: {exc.strerror or exc}") from exc
    origin = str(file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not valid UTF-8 (byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: {_describe_toml_error(str(exc))}") from exc
    return settings_from_dict(data, origin=origin, environ=env)


def settings_from_dict(data: Mapping[str, Any], *, origin: str = "<config>",
                       environ: Mapping[str, str] | None = None) -> Settings:
    """Validate parsed configuration (after `${NAME}` substitution from `environ`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a table at the top level")
    env = os.environ if environ is None else environ
    substituted = _substitute(dict(data), (), env, origin)
    try:
        return Settings.model_validate(substituted)
    except ValidationError as exc:
        # An unknown key first: a misspelt key also makes the key it was meant to be
        # "missing", and the misspelling is what the user has to see.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        loc, what = _describe(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = format_key_path(loc)
        raise ConfigError(f"{origin}: {where}: {what}{more}" if where
                          else f"{origin}: {what}{more}") from exc


# -- ${NAME} substitution ----------------------------------------------------------------------

def _substitute(value: Any, loc: Loc, environ: Mapping[str, str], origin: str) -> Any:
    if isinstance(value, str):
        return _substitute_string(value, loc, environ, origin)
    if isinstance(value, Mapping):
        return {key: _substitute(item, (*loc, key), environ, origin)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(item, (*loc, i), environ, origin) for i, item in enumerate(value)]
    return value


def _substitute_string(value: str, loc: Loc, environ: Mapping[str, str], origin: str) -> str:
    def replace(match: re.Match[str]) -> str:
        token, name = match.group(0), match.group(1)
        if token == "$${":
            return "${"
        if name is None:
            raise ConfigError(f"{origin}: {format_key_path(loc)}: "
                              "malformed ${NAME} reference (write $${ for a literal ${)")
        try:
            return environ[name]
        except KeyError:
            raise ConfigError(f"{origin}: {format_key_path(loc)}: "
                              f"environment variable {name} is not set") from None

    return _REFERENCE.sub(replace, value)


# -- turning pydantic's errors into one line ---------------------------------------------------

_EXPECTED = {
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected a boolean (true or false)",
    "bool_parsing": "expected a boolean (true or false)",
    "list_type": "expected an array",
    "tuple_type": "expected an array",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "string_too_short": "expected a non-empty string",
}


def _describe(error: ErrorDetails) -> tuple[Loc, str]:
    loc: Loc = tuple(part for part in error["loc"] if part != "[key]")
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == _ERROR_TYPE:
        return (*loc, *ctx.get("at", ())), error["msg"]
    if kind == "extra_forbidden":
        return loc, "unknown key" + _suggestion(loc)
    if kind == "missing":
        return loc, "missing required key"
    if kind == "literal_error":
        return loc, f"expected {ctx.get('expected', 'one of the documented values')}"
    if kind in ("greater_than", "greater_than_equal"):
        relation = "greater than" if kind == "greater_than" else "at least"
        bound = ctx.get("gt", ctx.get("ge"))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return loc, f"expected a number {relation} {bound}"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return loc, f"expected at least {count} item{'s' if count != 1 else ''}"
    if kind in _EXPECTED:
        return loc, _EXPECTED[kind]
    # Anything else: pydantic's own words, which do not contain the input.
    return loc, mask_dsn(error["msg"])


def _suggestion(loc: Loc) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _known_keys(loc: Loc) -> list[str]:
    """The keys allowed in the table at `loc`, walking the model types from `Settings`."""
    current: Any = Settings
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return []
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    if get_origin(annotation) is Annotated:
        return get_args(annotation)[0]
    return annotation


def _describe_toml_error(message: str) -> str:
    match = _TOML_POSITION.match(message)
    if match is None:
        return f"invalid TOML: {message}"
    what = match["what"]
    what = what[:1].lower() + what[1:]
    if match["end"]:
        return f"at end of document: invalid TOML: {what}"
    return f"line {match['line']}, column {match['col']}: invalid TOML: {what}"
