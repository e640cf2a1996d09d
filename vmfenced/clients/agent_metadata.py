"""The parameters of `fence_vmfenced` and the metadata XML Pacemaker reads from them.

One table serves the metadata, the usage text and the agent's option parser, so that what
the agent declares and what it accepts cannot drift apart. Standard library only.
"""

from __future__ import annotations

from vmfenced.clients.client import DEFAULT_SOCKET
from vmfenced.clients.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from typing import Final

AGENT_NAME = "fence_vmfenced"
# Order matters to Pacemaker only for `on`, which must carry `automatic`.
ACTIONS = (
    "on",
    "off",
    "reboot",
    "status",
    "list",
    "list-status",
    "monitor",
    "metadata",
    "manpage",
    "validate-all",
)
SHORTDESC = "Fence agent for VMs through the vmfenced daemon"
LONGDESC = (
    "fence_vmfenced asks the local vmfenced daemon, over its unix socket, to fence a virtual "
    "machine. The daemon keeps warm SSH sessions to every hypervisor host and a live map of "
    "which host runs which VM; it kills the VM's process with kill -9 over an already-open "
    "shell and confirms its death over the same channel. The plug is a VM display name or a "
    "cluster node name that the daemon's [aliases] section maps to a VM."
)
VENDOR_URL = "https://github.com/ClusterLabs/fence-agents"


class Param(Record):
    """One agent parameter: its stdin key is `name`, its long option `--name` with `-`."""

    __slots__ = _fields = (
        "name",
        "kind",
        "shortdesc",
        "short",
        "value_name",
        "default",
        "required",
        "deprecated",
        "obsoletes",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        shortdesc: str,
        short: str | None = None,
        value_name: str = "",
        *,
        default: str | None = None,
        required: bool = False,
        deprecated: bool = False,
        obsoletes: str | None = None,
    ) -> None:
        self.name: Final = name
        self.kind: Final = kind  # the metadata content type: string, second, integer or boolean
        self.shortdesc: Final = shortdesc
        self.short: Final = short
        self.value_name: Final = value_name
        self.default: Final = default
        self.required: Final = required
        self.deprecated: Final = deprecated
        self.obsoletes: Final = obsoletes

    @property
    def long_option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def takes_value(self) -> bool:
        return self.kind != "boolean"

    def getopt(self) -> str:
        spelled = self.long_option + (f"=[{self.value_name}]" if self.takes_value else "")
        return spelled if self.short is None else f"-{self.short}, {spelled}"


_UNUSED = "Accepted for compatibility and unused: vmfenced keeps its host sessions open"

PARAMS = (
    Param("action", "string", "Fencing action", "o", "action", default="reboot", required=True),
    Param(
        "plug",
        "string",
        "VM to act on: its display name, or a cluster node name mapped in [aliases]",
        "n",
        "id",
        required=True,
        obsoletes="port",
    ),
    Param(
        "port",
        "string",
        "VM to act on: its display name, or a cluster node name mapped in [aliases]",
        value_name="id",
        required=True,
        deprecated=True,
    ),
    Param(
        "socket",
        "string",
        "Path of the vmfenced daemon's unix socket",
        value_name="path",
        default=DEFAULT_SOCKET,
    ),
    Param(
        "delay",
        "second",
        "Wait X seconds before fencing is started (off and reboot only)",
        value_name="seconds",
        default="0",
    ),
    Param(
        "power_timeout",
        "second",
        "Wait at most X seconds (plus a 5 s margin) for the daemon to confirm an action; "
        "0 waits without limit",
        value_name="seconds",
        default="20",
    ),
    Param(
        "power_wait",
        "second",
        "Wait X seconds after a confirmed ON or OFF",
        value_name="seconds",
        default="0",
    ),
    Param("login_timeout", "second", _UNUSED, value_name="seconds", default="5"),
    Param("shell_timeout", "second", _UNUSED, value_name="seconds", default="3"),
    Param(
        "retry_on",
        "integer",
        "Count of attempts to power on",
        value_name="attempts",
        default="1",
    ),
    Param(
        "missing_as_off",
        "boolean",
        "Report a VM that no host runs or has registered as OFF instead of failing",
    ),
    Param("verbose", "boolean", "Verbose mode: log each request and reply on stderr", "v"),
    Param(
        "debug_file",
        "string",
        "Append what verbose mode shows, and every error, to this file",
        "D",
        "debugfile",
    ),
)


def _attr(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )


def metadata_xml() -> str:
    """The XML `metadata` prints; it validates against fence-agents' metadata.rng."""
    lines = [
        '<?xml version="1.0" ?>',
        f'<resource-agent name="{AGENT_NAME}" shortdesc="{_attr(SHORTDESC)}" >',
        f"<longdesc>{_attr(LONGDESC)}</longdesc>",
        f"<vendor-url>{_attr(VENDOR_URL)}</vendor-url>",
        "<parameters>",
    ]
    for param in PARAMS:
        extra = ' deprecated="1"' if param.deprecated else ""
        if param.obsoletes is not None:
            extra += f' obsoletes="{_attr(param.obsoletes)}"'
        default = "" if param.default is None else f' default="{_attr(param.default)}"'
        lines += [
            f'\t<parameter name="{param.name}" unique="0" required="{int(param.required)}"{extra}>',
            f'\t\t<getopt mixed="{_attr(param.getopt())}" />',
            f'\t\t<content type="{param.kind}"{default} />',
            f'\t\t<shortdesc lang="en">{_attr(param.shortdesc)}</shortdesc>',
            "\t</parameter>",
        ]
    lines += ["</parameters>", "<actions>"]
    for action in ACTIONS:
        # Unfencing is not automatic: `on` only runs when someone asks for it.
        automatic = ' automatic="0"' if action == "on" else ""
        lines.append(f'\t<action name="{action}"{automatic} />')
    lines += ["</actions>", "</resource-agent>"]
    return "\n".join(lines) + "\n"


def usage_text() -> str:
    lines = [
        "Usage:",
        f"\t{AGENT_NAME} [options]",
        f"\t{AGENT_NAME} < key=value lines on standard input (as Pacemaker calls it)",
        "Options:",
    ]
    for param in PARAMS:
        lines.append(f"   {param.getopt():<32} {param.shortdesc}")
    lines += [
        f"   {'-h, --help':<32} Display help and exit",
        f"   {'-V, --version':<32} Display version information and exit",
        f"Actions: {', '.join(ACTIONS)}",
    ]
    return "\n".join(lines) + "\n"
