"""The warm shell's framing and recovery, against a real sshd lab host."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncssh
import pytest
import pytest_asyncio

from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon.link import Lane
from vmfenced.errors import CommandTimeout, LinkDown, LinkError
from vmfenced.model import LinkState
from vmflab import Lab, LabHost

pytestmark = pytest.mark.integration


def make_lane(lab: Lab, host: LabHost, history: list[str] | None = None, **ssh: object) -> Lane:
    config = HostConfig(name=host.name, address=host.address, port=host.port)
    settings = SSHConfig(
        username=lab.username,
        client_keys=(lab.client_key,),
        known_hosts=lab.known_hosts,
        connect_timeout=3,
        **ssh,  # type: ignore[arg-type]
    )
    key = asyncssh.read_private_key(lab.client_key)
    seen = history if history is not None else []
    return Lane(
        config,
        settings,
        "fence",
        setup="LC_ALL=C",
        client_keys=[key],
        on_change=lambda lane: seen.append(f"{lane.state.value}: {lane.reason}"),
    )


@pytest.fixture
def history() -> list[str]:
    return []


@pytest_asyncio.fixture
async def lane(lab: Lab, history: list[str]) -> AsyncIterator[Lane]:
    lane = make_lane(lab, lab.hosts["esx1"], history)
    task = asyncio.create_task(lane.supervise())
    assert await lane.wait_settled(10) is LinkState.UP, lane.reason
    yield lane
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await lane.close()


@pytest.mark.asyncio
async def test_status_and_output(lane: Lane) -> None:
    result = await lane.run("echo hello; exit_code() { return 3; }; exit_code", 5)
    assert (result.status, result.output) == (3, "hello\n")
    result = await lane.run("printf 'no newline'", 5)
    assert (result.status, result.output) == (0, "no newline")


@pytest.mark.asyncio
async def test_fake_markers_and_stderr_do_not_end_a_command_early(lane: Lane) -> None:
    command = (
        "printf '\\n:vmf-end:0000000000000000:0\\n'; echo err >&2; "
        "printf ':vmf-end:'; echo out; echo err2 >&2"
    )
    result = await lane.run(command, 5)
    assert result.status == 0
    assert result.output == "\n:vmf-end:0000000000000000:0\nerr\n:vmf-end:out\nerr2\n"


@pytest.mark.asyncio
async def test_a_command_cannot_eat_the_next_ones(lane: Lane) -> None:
    # stdin is /dev/null for every command: `cat` must not swallow the channel.
    assert (await lane.run("cat", 5)).output == ""
    assert (await lane.run("echo still here", 5)).output == "still here\n"


@pytest.mark.asyncio
async def test_large_and_binary_output(lane: Lane) -> None:
    result = await lane.run("head -c 3000000 /dev/zero | tr '\\0' x; printf '\\377\\n'", 10)
    assert result.output == "x" * 3_000_000 + "\ufffd\n"


@pytest.mark.asyncio
async def test_concurrent_commands_are_serialised_and_answers_not_mixed(lane: Lane) -> None:
    results = await asyncio.gather(*(lane.run(f"echo {i}; echo {i} >&2", 10) for i in range(50)))
    assert [r.output for r in results] == [f"{i}\n{i}\n" for i in range(50)]


@pytest.mark.asyncio
async def test_timeout_resets_the_shell_and_the_lane_recovers(
    lane: Lane, history: list[str]
) -> None:
    history.clear()
    with pytest.raises(CommandTimeout):
        await lane.run("sleep 5; echo late", 0.3)
    # The late "late" must never appear as the answer to a later command: the shell is reset.
    assert await lane.wait_state(LinkState.UP, 10)
    assert "down: a command was interrupted; connection reset" in history
    assert (await lane.run("echo fresh", 5)).output == "fresh\n"


@pytest.mark.asyncio
async def test_dead_host_goes_down_and_comes_back(lab: Lab, lane: Lane) -> None:
    host = lab.hosts["esx1"]
    host.stop_sshd()
    with pytest.raises(LinkError):
        await lane.run("echo x", 5)
    assert await lane.wait_state(LinkState.DOWN, 10)
    host.start_sshd()
    assert await lane.wait_state(LinkState.UP, 15)
    assert (await lane.run("echo back", 5)).output == "back\n"


@pytest.mark.asyncio
async def test_unknown_host_key_is_refused(lab: Lab) -> None:
    host = lab.hosts["esx2"]
    lane = make_lane(lab, host)
    lane.ssh = lane.ssh.model_copy(
        update={"known_hosts": lab.client_key.with_name("empty_known_hosts")}
    )
    lane.ssh.known_hosts.write_text("")
    task = asyncio.create_task(lane.supervise())
    try:
        assert await lane.wait_state(LinkState.DOWN, 10)
        assert lane.reason is not None and "host key not verifiable" in lane.reason
        with pytest.raises(LinkDown):
            await lane.run("echo x", 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
