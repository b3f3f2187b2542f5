"""Private swarms end to end: keys and invitations from `hiveengine swarm`, members that train and store, and
non-members, expired, forged or foreign certificates refused at the handshake (real processes on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.matchmaking import Mode
from hiveengine.cli.launch import BOOTSTRAP_PREFIX
from hiveengine.dht import DHT, DHTConfig, get_dht_time, protocol
from hiveengine.engine.engine import Engine
from hiveengine.engine.env import LaunchEnv
from hiveengine.errors import BootstrapError, ConfigurationError, HandshakeError, MembershipError
from hiveengine.moe.client.calls import acall_forward
from hiveengine.moe.protocol import TensorSchema
from hiveengine.moe.server.backend import ExpertBackend
from hiveengine.moe.server.server import Server
from hiveengine.transport import Identity, Peer, handshake, membership
from tests.procs import PEERS, PeerProcess

pytestmark = pytest.mark.timeout(180)
WORKER = str(PEERS / "launch_worker.py")


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The owner's swarm key and a member's membership file, made with the CLI; an expired chain and another
    swarm's member file, made with the library."""
    root = tmp_path_factory.mktemp("swarm")
    made = cli("swarm", "keygen", "-o", str(root / "owner.key"))
    assert made.returncode == 0 and made.stdout.startswith("swarm "), made
    invited = cli("swarm", "invite", "--swarm-key", str(root / "owner.key"), "-o", str(root / "member.swarm"))
    assert invited.returncode == 0, invited
    owner = membership.load(root / "owner.key")
    key = membership.generate_swarm_key()
    expired = owner.chain_for_key(membership.public_bytes(key), time.time() - 60, membership.ROLE_HOST_EXPERTS)
    other = membership.generate_swarm_key()
    foreign = membership.SwarmCredentials(membership.public_bytes(other), (), other)
    (root / "foreign.swarm").write_bytes(membership.swarm_key_file(other))
    return {
        "root": root,
        "owner": owner,
        "expired": membership.SwarmCredentials(owner.swarm, expired, key),
        "foreign": foreign,
    }


@pytest.fixture
def private_node(files):
    proc = PeerProcess("dht_nodes.py", "--swarm", str(files["root"] / "owner.key"))
    try:
        address = proc.expect("ADDRESS")
        proc.expect("READY")
        yield address
    finally:
        proc.close()


@pytest.fixture(autouse=True)
def open_again():
    """Each test chooses its own swarm; the process is an open swarm again after it."""
    yield
    membership.use(None)


def test_a_member_stores_and_reads_in_a_private_swarm(files, private_node):
    membership.use(membership.load(files["root"] / "member.swarm"))
    with DHT(initial_peers=[private_node]) as node:
        assert node.store("members-only", 42, get_dht_time() + 60, timeout=30)
    with DHT(initial_peers=[private_node]) as reader:
        assert reader.get("members-only", latest=True, timeout=30).value == 42


def test_a_non_member_is_refused_at_the_handshake_with_a_clear_error(files, private_node):
    membership.use(None)  # an open-swarm process that knows the address
    outsider = Peer()
    try:
        with pytest.raises(MembershipError, match=r"belongs to private swarm .*HIVEENGINE_SWARM"):
            outsider.call_sync(private_node, "dht.ping", {"s": None}, timeout=10)
    finally:
        outsider.shutdown()
    with pytest.raises(BootstrapError, match="MembershipError"):
        DHT(initial_peers=[private_node], config=DHTConfig(rpc_timeout=5))


@pytest.mark.parametrize("who", ["expired", "forged", "foreign"])
def test_expired_forged_and_foreign_certificates_are_refused_by_the_member(files, private_node, who):
    """The dialer presents its chain; the private node checks it and answers REFUSED, which the dialer reports."""
    if who == "forged":  # a key that signs its own certificate in the owner's name
        impostor = membership.generate_swarm_key()
        credentials = membership.SwarmCredentials(files["owner"].swarm, (), impostor)
    else:
        credentials = files[who]
    membership.use(credentials)
    peer = Peer()
    try:
        expected = {
            "expired": "refused us: this process is not a member .*expired at",
            "forged": "refused us: this process is not a member .*not issued by swarm",
            "foreign": "not to this process's swarm",
        }[who]
        with pytest.raises(MembershipError, match=expected):
            peer.call_sync(private_node, "dht.ping", {"s": None}, timeout=10)
    finally:
        peer.shutdown()
    membership.use(files["owner"])  # the node served nobody else meanwhile, and still serves members
    member = Peer()
    try:
        member.call_sync(private_node, "dht.ping", protocol.versioned({"s": None}), timeout=10)
    finally:
        member.shutdown()


def assert_member_cannot_dial(files, match: str, *node_args: str) -> None:
    """A member of the owner's swarm dialling a DHT node started with `node_args` is refused after the handshake
    with a MembershipError matching `match`."""
    proc = PeerProcess("dht_nodes.py", *node_args)
    try:
        address = proc.expect("ADDRESS")
        proc.expect("READY")
        membership.use(files["owner"])
        member = Peer()
        try:
            with pytest.raises(MembershipError, match=match):
                member.call_sync(address, "dht.ping", protocol.versioned({"s": None}), timeout=10)
        finally:
            member.shutdown()
    finally:
        proc.close()


def test_a_member_refuses_a_listener_outside_its_swarm(files):
    assert_member_cannot_dial(files, "belongs to an open swarm")  # an open-swarm node


def test_a_hello_announcing_too_many_certificates_is_refused_before_reading_them():
    hello = handshake.Hello(1, handshake.NO_TARGET, Identity.generate().public_key, bytes(32), bytes(32))
    fixed = bytearray(hello.pack())
    fixed[-2:] = (65535).to_bytes(2, "little")
    with pytest.raises(MembershipError, match="MAX_CHAIN"):
        handshake.Hello.unpack(bytes(fixed))
    assert issubclass(MembershipError, HandshakeError)


def test_chains_narrow_roles_and_cannot_grow_past_max_chain(files):
    owner = files["owner"]
    member_key = membership.generate_swarm_key()
    chain = owner.chain_for_key(membership.public_bytes(member_key), time.time() + 60, membership.ROLE_CLIENT_ONLY)
    member = membership.SwarmCredentials(owner.swarm, chain, member_key)
    worker = Identity.generate()
    worker_chain = member.chain_for(worker)
    roles = membership.verify_chain(owner.swarm, worker.public_key, worker_chain)
    assert roles == membership.ROLE_CLIENT_ONLY  # no expert hosting, and the restriction carries down
    deep = membership.SwarmCredentials(owner.swarm, worker_chain, member_key)
    with pytest.raises(MembershipError, match="at most 2"):
        deep.chain_for(Identity.generate())
    with pytest.raises(ConfigurationError, match="expired"):
        path = files["root"] / "expired.swarm"
        expired = files["expired"]
        path.write_bytes(membership.membership_file(expired.swarm, expired.chain, expired.key))
        membership.load(path)


def test_workers_launched_with_the_swarm_key_train_together(files):
    launcher = PeerProcess(
        "hiveengine.cli", "launch", "--swarm", str(files["root"] / "owner.key"), "--nproc", "2", WORKER, "train"
    )
    try:
        assert launcher.expect(BOOTSTRAP_PREFIX).startswith("ucx://")
        done = {}
        while len(done) < 2:
            rank, _, rest = launcher.expect("[worker ").partition("] ")
            if rest.startswith("DONE"):
                done[rank] = rest.split()[1:]
        assert launcher.proc.wait(60) == 0, launcher.tail()
    finally:
        launcher.kill()
    assert {d[0] for d in done.values()} == {"3"} and len({d[1] for d in done.values()}) == 1, done


def test_cli_errors_are_one_line(files, tmp_path):
    expired = files["expired"]
    (tmp_path / "expired.swarm").write_bytes(membership.membership_file(expired.swarm, expired.chain, expired.key))
    for args in (
        ["launch", "--swarm", str(tmp_path / "expired.swarm"), WORKER, "exit"],
        ["launch", "--swarm", str(tmp_path / "missing"), WORKER, "exit"],
        ["swarm", "invite", "--swarm-key", str(tmp_path / "expired.swarm"), "-o", str(tmp_path / "x")],
        ["swarm", "invite", "notakey", "--swarm-key", str(files["root"] / "owner.key"), "-o", str(tmp_path / "y")],
        ["swarm", "keygen", "-o", str(files["root"] / "owner.key")],
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hiveengine ") and "Traceback" not in result.stderr, lines


def test_a_client_only_member_calls_members_but_nobody_dials_it(files, private_node):
    invited = cli(
        "swarm", "invite", "--swarm-key", str(files["root"] / "owner.key"), "--role", "client-only",
        "-o", str(files["root"] / "client.swarm"),
    )  # fmt: skip
    assert invited.returncode == 0, invited
    client_only = membership.load(files["root"] / "client.swarm")
    assert client_only.roles & membership.ROLE_CLIENT_ONLY
    membership.use(client_only)
    caller = Peer()
    try:  # it may call a member
        caller.call_sync(private_node, "dht.ping", protocol.versioned({"s": None}), timeout=10)
    finally:
        caller.shutdown()
    engine = Engine(LaunchEnv(swarm=str(files["root"] / "client.swarm")))
    try:  # and runs as a client, since nobody will dial it
        assert engine.client_mode and engine.dht.client_mode and engine.averaging_client_mode
        averager = DecentralizedAverager([torch.zeros(3)], engine.dht, "client-only-test")
        assert averager.me.mode == Mode.CLIENT
        averager.shutdown()
    finally:
        engine.shutdown()

    assert_member_cannot_dial(files, "client-only member of this swarm", "--swarm", str(files["root"] / "client.swarm"))


def test_only_members_with_the_host_experts_role_serve_experts(files):
    owner = files["owner"]
    key = membership.generate_swarm_key()
    chain = owner.chain_for_key(membership.public_bytes(key), time.time() + 3600, 0)  # a member with no role
    (files["root"] / "plain.swarm").write_bytes(membership.membership_file(owner.swarm, chain, key))
    membership.use(membership.load(files["root"] / "plain.swarm"))
    with pytest.raises(MembershipError, match="does not allow hosting experts"):
        Server({"ffn.0": ExpertBackend("ffn.0", torch.nn.Linear(2, 2), [TensorSchema((2,))])}, start=False)

    membership.use(owner)
    caller = Peer()
    servers = {
        "plain": PeerProcess("unlicensed_expert.py", str(files["root"] / "plain.swarm")),
        "licensed": PeerProcess("unlicensed_expert.py", str(files["root"] / "member.swarm")),
    }
    try:
        x = torch.randn(3, 2)
        address = servers["plain"].expect("ADDRESS")
        with pytest.raises(MembershipError, match="may not host experts in this swarm"):
            caller.runtime.run(acall_forward(caller, "ffn.0", address, [x], timeout=10), 20)
        address = servers["licensed"].expect("ADDRESS")  # an invite's default role is host-experts
        (echoed,) = caller.runtime.run(acall_forward(caller, "ffn.0", address, [x], timeout=10), 20)
        assert torch.equal(echoed, x)
    finally:
        caller.shutdown()
        for server in servers.values():
            server.close()
