"""The plugin host: discovers plugins through entry points, isolates their faults and owns policy.

Each entry point is imported inside its own try/except, and each hook implementation is
called on its own, so one broken plugin is reported (``agent plugins``) while the rest keep
working. Name collisions and bundle validation are decided here, never in plugins.
"""

from __future__ import annotations

import difflib
import importlib.metadata as metadata
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from hyperlex import hookspecs
from hyperlex.errors import UnknownPersona
from hyperlex.persona.bundle import BundleError, Persona

if TYPE_CHECKING:
    import click

    from hyperlex.agent.controller import Turn
    from hyperlex.scene.model import Scene

ENTRY_POINT_GROUP = "hyperlex"
LOAD_ENV = "HYPERLEX_LOAD_PLUGINS"
HOST_DISTRIBUTION = "hyperlex"


@dataclass
class PluginRecord:
    """What ``agent plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Registration:
    """Something a plugin registered (a persona, encoder or router) and who registered it."""

    name: str
    value: Any
    plugin: str


class Host:
    """Loads plugins and holds what they registered.

    ``extra_plugins`` (name -> module or object) are registered in addition to entry points;
    tests and embedding applications use it. ``entry_points=False`` skips discovery entirely.
    """

    def __init__(self, extra_plugins: dict[str, object] | None = None, entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.problems: list[str] = []  # registrations skipped by the host's policy
        self._failures: list[str] = []  # every problem, in the order it happened
        self._personas: dict[str, Registration] | None = None
        self._encoders: dict[str, Registration] | None = None
        self._routers: dict[str, Registration] | None = None
        if entry_points:
            self._load_entry_points()
        for name, plugin in (extra_plugins or {}).items():
            self._register(plugin, PluginRecord(name=name, module=_module_name(plugin)))

    # discovery -------------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        allowed = _allowed_plugins()
        seen: set[tuple[str | None, str]] = set()
        for ep in sorted(
            metadata.entry_points(group=ENTRY_POINT_GROUP),
            key=lambda e: (not _is_builtin(e), e.name),
        ):
            dist = ep.dist.name if ep.dist else None
            if (dist, ep.name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((dist, ep.name))
            builtin = _is_builtin(ep)
            if not builtin and allowed is not None and not {_norm(ep.name), _norm(dist)} & allowed:
                continue
            name = ep.name if builtin or ep.name not in self.plugins else f"{dist}:{ep.name}"
            record = PluginRecord(
                name=name,
                distribution=dist,
                module=ep.value,
                builtin=builtin,
                version=ep.dist.version if ep.dist else None,
            )
            try:
                plugin = ep.load()
            except Exception as exc:  # a plugin's import error must not take the host down
                self.plugins[name] = record
                self._plugin_error(name, f"failed to load {ep.value}: {_describe(exc)}")
                continue
            self._register(plugin, record)

    def _register(self, plugin: object, record: PluginRecord) -> None:
        self.plugins[record.name] = record
        try:
            self.pm.register(plugin, name=record.name)
        except Exception as exc:  # pluggy validates hook names and signatures here
            self._plugin_error(record.name, f"failed to register: {_describe(exc)}")
            return
        callers = self.pm.get_hookcallers(plugin) or []
        record.hooks = sorted(c.name for c in callers if c.spec is not None)
        for caller in callers:
            problem = _hook_problem(caller, plugin)
            if problem:
                self._plugin_error(record.name, problem)

    def _impls(self, hook_name: str) -> list[Any]:
        """Implementations of a hook in pluggy's call order (tryfirst/trylast honoured, otherwise
        the most recently registered first), with built-in plugins moved to the front."""
        impls = [i for i in reversed(getattr(self.pm.hook, hook_name).get_hookimpls())
                 if not (i.wrapper or i.hookwrapper)]
        return sorted(
            impls,
            key=lambda i: not self.plugins.get(i.plugin_name, PluginRecord(i.plugin_name)).builtin,
        )

    def _call(self, impl: Any, hook_name: str, kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """Call one implementation; a plugin that raises is recorded and (False, None) returned."""
        try:
            return True, impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            self._plugin_error(impl.plugin_name, f"{hook_name} raised {_describe(exc)}")
            return False, None

    def _call_each(self, hook_name: str, **kwargs: Any) -> Iterable[tuple[str, Any]]:
        """Call every implementation of a hook on its own; yield (plugin, result) for each
        that did not raise."""
        for impl in self._impls(hook_name):
            ok, result = self._call(impl, hook_name, kwargs)
            if ok:
                yield impl.plugin_name, result

    def _plugin_error(self, plugin: str, message: str) -> None:
        self.plugins.setdefault(plugin, PluginRecord(name=plugin)).errors.append(message)
        self._failures.append(f"plugin {plugin!r}: {message}")

    def report(self, message: str) -> None:
        """Record a problem found while applying the host's policy (shown by every command)."""
        self.problems.append(message)
        self._failures.append(message)

    # registries --------------------------------------------------------------------------

    def _collect(
        self, hook_name: str, what: str, convert: Callable[[tuple[Any, ...]], tuple[str, Any]]
    ) -> dict[str, Registration]:
        """Run a register-style hook and apply the host's policy to what comes back:
        invalid registrations are reported and skipped, and the first name registered wins."""
        calls: list[tuple[str, tuple[Any, ...]]] = []
        for impl in self._impls(hook_name):

            def register(*args: Any, _plugin: str = impl.plugin_name) -> None:
                calls.append((_plugin, args))

            self._call(impl, hook_name, {"register": register})
        found: dict[str, Registration] = {}
        for plugin, args in calls:
            try:
                name, value = convert(args)
            except (BundleError, TypeError, ValueError) as exc:
                self.report(f"{what} from plugin {plugin!r} skipped: {exc}")
                continue
            if name in found:
                self.report(f"{what} {name!r} from plugin {plugin!r} skipped: already "
                              f"registered by plugin {found[name].plugin!r}")
                continue
            found[name] = Registration(name, value, plugin)
        return found

    @property
    def persona_registrations(self) -> dict[str, Registration]:
        if self._personas is None:
            self._personas = self._collect("register_personas", "persona", _persona_from_args)
        return self._personas

    @property
    def personas(self) -> dict[str, Persona]:
        return {name: reg.value for name, reg in self.persona_registrations.items()}

    def persona(self, name: str) -> Persona:
        try:
            return self.personas[name]
        except KeyError:
            raise UnknownPersona(name, list(self.personas)) from None

    def plugin_of(self, persona: str) -> str:
        return self.persona_registrations[persona].plugin

    @property
    def scene_encoders(self) -> dict[str, Any]:
        if self._encoders is None:
            self._encoders = self._collect("register_scene_encoders", "scene encoder", _named)
        return {name: reg.value for name, reg in self._encoders.items()}

    @property
    def routers(self) -> dict[str, Any]:
        if self._routers is None:
            self._routers = self._collect("register_routers", "router", _named)
        return {name: reg.value for name, reg in self._routers.items()}

    # hooks called per command or per turn ------------------------------------------------------

    def add_commands(self, cli: click.Group) -> None:
        for _ in self._call_each("register_commands", cli=cli):
            pass

    def route_turn(
        self,
        message: str,
        scene: Scene | None,
        personas: Mapping[str, Persona],
        current: str | None,
    ) -> tuple[str, str] | None:
        """The first ``route_turn`` answer naming one of ``personas``, as (persona, plugin).

        The implementations are asked one at a time, in :meth:`_impls` order, and the first
        valid answer ends the search: later implementations are not called. One that raises,
        or answers with something that is not a key of ``personas``, is recorded as its
        plugin's error and the next one is asked. (Pluggy's ``firstresult`` cannot do this: it
        stops at the first exception and accepts any non-None answer.) Plugins get
        ``personas`` as a read-only mapping in name order."""
        view = MappingProxyType(dict(sorted(personas.items())))
        for plugin, answer in self._call_each(
            "route_turn", message=message, scene=scene, personas=view, current=current
        ):
            if answer is None:
                continue
            if not isinstance(answer, str) or answer not in view:
                self._plugin_error(plugin, f"route_turn chose unknown persona {answer!r}")
                continue
            return answer, plugin
        return None

    def on_turn(self, turn: Turn, scene: Scene) -> None:
        for _ in self._call_each("on_turn", turn=turn, scene=scene):
            pass

    def run_registrations(self) -> None:
        """Call every register-style hook now (they otherwise run on first use)."""
        _ = (self.persona_registrations, self.scene_encoders, self.routers)

    @property
    def failures(self) -> list[str]:
        """Every problem so far, one line each and in the order they happened: broken plugins
        and skipped registrations."""
        return list(self._failures)


def _hook_problem(caller: Any, plugin: object) -> str | None:
    """Why a plugin's implementation of ``caller`` can never be called, if it can't."""
    if caller.spec is None:
        close = difflib.get_close_matches(caller.name, _HOOK_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"implements unknown hook {caller.name!r}{hint}"
    wrappers = [i for i in caller.get_hookimpls()
                if i.plugin is plugin and (i.wrapper or i.hookwrapper)]
    if wrappers:
        return (f"{caller.name}: hook wrappers are not supported (each implementation is called "
                "on its own so that one failing plugin cannot break the others)")
    return None


_HOOK_NAMES = [n for n in dir(hookspecs) if n.startswith(("register_", "route_", "on_"))]


def _persona_from_args(args: tuple[Any, ...]) -> tuple[str, Persona]:
    if len(args) != 1:
        raise TypeError("register() takes one bundle directory or Persona")
    (value,) = args
    if isinstance(value, Persona):
        return value.name, value
    if isinstance(value, str | os.PathLike):
        persona = Persona.from_dir(Path(value))
        return persona.name, persona
    raise TypeError(f"register() expects a bundle directory or Persona, got {type(value).__name__}")


def _named(args: tuple[Any, ...]) -> tuple[str, Any]:
    if len(args) != 2 or not isinstance(args[0], str):
        raise TypeError("register() takes a name and an object")
    return args[0], args[1]


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {_norm(part) for part in raw.split(",") if part.strip()}


def _norm(name: str | None) -> str:
    """Distribution-style normalisation, so hyperlex_stoic and hyperlex-stoic both match."""
    return (name or "").strip().lower().replace("_", "-").replace(".", "-")


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return bool(ep.dist and ep.dist.name == HOST_DISTRIBUTION)


def _module_name(plugin: object) -> str | None:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return type(plugin).__module__


def _describe(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
