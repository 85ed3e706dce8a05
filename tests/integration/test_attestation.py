"""Attested provisioning through the real agent and controller, with swtpm on the host as the
installer's TPM (the VM path is tests/integration/test_metal.py): enrollment, quotes checked
against golden values, approvals bound to the TPM, and every refusal leaving the disk as it
was, with a ``refused`` event.

On a host no firmware measured anything into swtpm: each test writes the event log and
extends the PCRs itself (tests/tpm.py, test scaffolding). Everything else is real: swtpm,
tpm2-tools, nats-server, the agent and ``nbd-nats ctl``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from nbdnats import subjects
from nbdnats.metal.tpm import Tpm
from nbdnats.schemas import (
    ActivateCommand,
    ActivateReply,
    Approval,
    ProvisionCommand,
    QuoteCommand,
    TpmIdentity,
    encode,
)
from tests.cli import one_line_error, run_cli
from tests.ctl import AgentProc, ctl, ctl_request, ok, stored_events
from tests.images import MiB, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.tpm import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_SEPARATOR,
    SwtpmProc,
    event_log_for,
    extend_pcrs,
)
from tests.waits import wait_for

# What a firmware would have measured: the test's "boot".
BOOT = [
    (0, EV_SEPARATOR, b"firmware v1"),
    (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"installer.efi v1"),
    (7, EV_SEPARATOR, b"secure boot off"),
]


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


def boot(tpm: SwtpmProc, log: Path, extra: list[tuple[int, int, bytes]] | None = None) -> None:
    """Measure BOOT (and ``extra``) into the TPM and write the matching event log."""
    events = BOOT + (extra or [])
    extend_pcrs(tpm, BOOT + (extra or []))
    log.write_bytes(event_log_for(events))


class Site:
    """An image host, an installer (its TPM: a swtpm) with a disk, an approver's key."""

    def __init__(
        self, url: str, tmp: Path, start_agent: Callable[..., AgentProc], tpm: SwtpmProc
    ) -> None:
        self.url, self.tmp, self.start_agent, self.tpm = url, tmp, start_agent, tpm
        self.keys = tmp / "trusted"
        self.keys.mkdir()
        ok(run_cli("approve", "--new-key", str(tmp / "ops")))
        shutil.copy(tmp / "ops.pub", self.keys / "ops.pub")
        self.devdir = tmp / "dev"
        self.devdir.mkdir()
        self.device = self.devdir / "vda"
        self.device.write_bytes(b"\xa5" * (16 * MiB))
        self.images = tmp / "images"
        self.images.mkdir()
        self.image = self.images / "os.raw"
        make_image(self.image, 8 * MiB, [(0, 3 * MiB), (5 * MiB, MiB)], seed=17)
        self.enrolled = tmp / "enrolled"
        self.log = tmp / "event-log"
        self.then = tmp / "then"
        boot(tpm, self.log)
        start_agent("images", url, "--allow", str(self.images))
        self.inst = self.installer(tpm)

    def installer(self, tpm: SwtpmProc) -> AgentProc:
        return self.start_agent(
            "inst1",
            self.url,
            "--role",
            "installer",
            "--trusted-keys",
            str(self.keys),
            "--allow",
            str(self.devdir),
            "--tpm",
            tpm.tcti,
            "--event-log",
            str(self.log),
            "--then-file",
            str(self.then),
            "--state-dir",
            str(self.tmp / f"state-{tpm.port}"),
        )

    def ctl(self, *args: str) -> tuple[int, str, str]:
        proc = ctl(self.url, *args)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    def enroll(self, ca: Path | None = None) -> str:
        ca = ca or self.tpm.ca_bundle
        return ok(ctl(self.url, "enroll", "inst1", "--ek-ca", str(ca), *self.store))

    @property
    def store(self) -> tuple[str, str]:
        return ("--enrollments", str(self.enrolled))

    def attestation(self, golden: Path | None = None) -> Path:
        out = self.tmp / "inst1.attestation"
        more = ["--golden", str(golden)] if golden else []
        out.write_text(ok(ctl(self.url, "--json", "attest", "inst1", *more, *self.store)))
        return out

    def record_golden(self) -> Path:
        golden = self.tmp / "installer.golden"
        ok(ctl(self.url, "attest", "inst1", "--record-golden", str(golden), *self.store))
        return golden

    def approve(self, name: str, *args: str) -> Path:
        out = self.tmp / f"{name}.json"
        for_it = ("--node", "inst1", "--device", str(self.device), "--image", str(self.image))
        key = str(self.tmp / "ops.key")
        ok(run_cli("approve", "--key", key, *for_it, "-o", str(out), *args))
        return out

    def provision(self, approval: Path, *args: str) -> tuple[int, str]:
        proc = ctl(
            self.url,
            "provision",
            f"images:{self.image}",
            f"inst1:{self.device}",
            "--approval",
            str(approval),
            *self.store,
            *args,
        )
        text = proc.stderr.decode()
        return proc.returncode, one_line_error(proc) if proc.returncode else text

    def refused(self) -> list[dict[str, object]]:
        return [e for e in stored_events(self.url, "refused") if e["node"] == "inst1"]


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[SwtpmProc]:
    t = SwtpmProc(tmp_path / "tpm1")
    yield t
    t.stop()


@pytest.fixture
def site(url: str, tmp_path: Path, start_agent: Callable[..., AgentProc], tpm: SwtpmProc) -> Site:
    return Site(url, tmp_path, start_agent, tpm)


def assert_refused_and_untouched(site: Site, before: str, code: int, line: str, want: str) -> None:
    assert code == 1, line
    assert want in line, line
    assert sha256_file(site.device) == before
    refused = site.refused()
    assert refused and refused[-1]["code"] == "attestation", refused
    assert want in str(refused[-1]["error"]), refused[-1]
    assert not site.then.exists()


def test_enrolled_installer_is_attested_and_a_bound_provision_writes_and_reboots(
    site: Site,
) -> None:
    """The whole path: the installer announces its AK; enrollment proves it under a
    certified EK; golden values recorded; an approval bound to AK + PCR digest; the
    provision verifies, and the installer tells /init to reboot and stops."""
    nodes = {n["node"]: n for n in json.loads(ok(ctl(site.url, "--json", "nodes")))}
    assert nodes["inst1"]["role"] == "installer" and "attest" in nodes["inst1"]["capabilities"]
    out = site.enroll()
    assert out == ""
    enrollment = json.loads((site.enrolled / "inst1.json").read_text())
    assert enrollment["ak_name"] == nodes["inst1"]["ak_name"]
    assert oct((site.enrolled / "inst1.json").stat().st_mode & 0o777) == "0o600"
    golden = site.record_golden()
    attestation = site.attestation(golden)
    doc = json.loads(attestation.read_text())
    assert set(doc["pcrs"]) == {"0", "4", "7"} and doc["ak_name"] == enrollment["ak_name"]
    approval = site.approve("bound", "--attestation", str(attestation))
    code, text = site.provision(approval, "--golden", str(golden), "--then", "reboot")
    want = sha256_file(site.image)
    assert code == 0, text
    assert f"verified sha256:{want}" in text and "inst1 reboots" in text
    assert sha256_file(site.device, site.image.stat().st_size) == want
    wait_for(lambda: site.inst.proc.poll() is not None, "the installer's agent to stop", 60)
    assert site.inst.proc.returncode == 0
    assert site.then.read_text() == "reboot\n"


def test_an_ek_certificate_from_a_ca_not_configured_is_refused(site: Site, tmp_path: Path) -> None:
    other = SwtpmProc(tmp_path / "tpm-other")
    try:
        proc = ctl(site.url, "enroll", "inst1", "--ek-ca", str(other.ca_bundle), *site.store)
    finally:
        other.stop()
    assert proc.returncode == 1
    assert "EK certificate" in one_line_error(proc)
    assert not (site.enrolled / "inst1.json").exists()


def test_an_ak_from_another_tpm_cannot_be_enrolled(site: Site, tmp_path: Path) -> None:
    """A node posing as inst2 offers a genuine EK certificate (inst1's TPM) with an AK of
    its own TPM: the credential is encrypted to the certified EK, so it cannot open it."""
    other = SwtpmProc(tmp_path / "tpm-other")
    genuine = Tpm(tmp_path / "w1", tcti=site.tpm.tcti)
    forged = Tpm(tmp_path / "w2", tcti=other.tcti)

    async def pose() -> int:
        import nats

        nc = await nats.connect(site.url)
        ek = await genuine.identity()
        mine = await forged.identity()

        async def identity(msg: object) -> None:
            reply = TpmIdentity(
                ok=True,
                node="inst2",
                ek_certificate=ek.ek_certificate,
                ek_public=ek.ek_public,
                ak_public=mine.ak_public,
            )
            await msg.respond(encode(reply))  # type: ignore[attr-defined]

        async def activate(msg: object) -> None:
            cmd = msgspec.json.decode(msg.data, type=ActivateCommand)  # type: ignore[attr-defined]
            try:
                secret = await forged.activate(cmd.credential, cmd.secret)
            except Exception:
                secret = os.urandom(32)  # the best a forger can do
            await msg.respond(encode(ActivateReply(ok=True, secret=secret)))  # type: ignore[attr-defined]

        await nc.subscribe(subjects.ctl_query("inst2", "tpm"), cb=identity)
        await nc.subscribe(subjects.ctl_command("inst2", "activate"), cb=activate)
        await nc.flush()
        proc = await asyncio.to_thread(
            ctl, site.url, "enroll", "inst2", "--ek-ca", str(site.tpm.ca_bundle), *site.store
        )
        await nc.close()
        assert "could not activate the credential" in one_line_error(proc), proc.stderr
        return proc.returncode

    try:
        assert asyncio.run(pose()) == 1
    finally:
        other.stop()
    assert not (site.enrolled / "inst2.json").exists()


def test_another_tpm_state_after_enrollment_is_refused(
    site: Site, tmp_path: Path, start_agent: Callable[..., AgentProc]
) -> None:
    """The machine comes back with another TPM (another swtpm's state): its quotes do not
    verify with the enrolled AK, and nothing is written."""
    site.enroll()
    golden = site.record_golden()
    assert site.inst.stop() == 0
    other = SwtpmProc(tmp_path / "tpm-other")
    try:
        boot(other, site.log)
        site.inst = site.installer(other)
        before = sha256_file(site.device)
        approval = site.approve("plain")
        code, line = site.provision(approval, "--golden", str(golden))
        assert_refused_and_untouched(
            site, before, code, line, "does not verify with the enrolled attestation key"
        )
    finally:
        other.stop()


def test_pcr_values_unlike_the_golden_ones_are_refused(site: Site) -> None:
    """Something else was measured (a different or tampered installer): PCR 4 differs
    from the golden value, and the quote's evidence is refused before a byte is written."""
    site.enroll()
    golden = site.record_golden()
    boot_more = [(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"something else")]
    extend_pcrs(site.tpm, boot_more)
    site.log.write_bytes(event_log_for(BOOT + boot_more))
    before = sha256_file(site.device)
    code, line = site.provision(site.approve("plain"), "--golden", str(golden))
    assert_refused_and_untouched(site, before, code, line, "PCR 4 differs from the golden value")


def test_an_event_log_that_hides_a_measurement_is_refused(site: Site) -> None:
    site.enroll()
    extend_pcrs(site.tpm, [(7, EV_SEPARATOR, b"hidden")])  # measured, but not in the log
    before = sha256_file(site.device)
    code, line = site.provision(site.approve("plain"), "--attest")
    assert_refused_and_untouched(site, before, code, line, "does not match")


def test_a_replayed_quote_is_refused(site: Site, tmp_path: Path) -> None:
    """A node answers the controller's nonce with a genuine quote recorded earlier."""
    site.enroll()
    old = QuoteCommand(nonce=os.urandom(32))
    recorded = ctl_request(site.url, subjects.ctl_command("inst1", "quote"), encode(old))
    assert recorded["ok"] is True
    shutil.copy(site.enrolled / "inst1.json", site.enrolled / "inst2.json")
    doc = json.loads((site.enrolled / "inst2.json").read_text())
    doc["node"] = "inst2"
    (site.enrolled / "inst2.json").write_text(json.dumps(doc))

    async def replay() -> tuple[int, str]:
        import nats

        nc = await nats.connect(site.url)

        async def answer(msg: object) -> None:
            await msg.respond(json.dumps(recorded).encode())  # type: ignore[attr-defined]

        await nc.subscribe(subjects.ctl_command("inst2", "quote"), cb=answer)
        await nc.flush()
        proc = await asyncio.to_thread(ctl, site.url, "attest", "inst2", *site.store)
        await nc.close()
        return proc.returncode, one_line_error(proc)

    code, line = asyncio.run(replay())
    assert code == 1 and "another nonce" in line, line


def test_a_provision_naming_a_quote_the_installer_did_not_make_is_refused(site: Site) -> None:
    """Someone with a bound approval but no attestation sends the provision themselves,
    with a made-up nonce, then with the nonce of a quote already used: both refused."""
    site.enroll()
    attestation = site.attestation()
    approval = msgspec.json.decode(
        site.approve("bound", "--attestation", str(attestation)).read_bytes(), type=Approval
    )
    before = sha256_file(site.device)
    digest = ok(run_cli("digest", str(site.image))).split()[0]
    for n, nonce in enumerate([os.urandom(32), None]):
        cmd = ProvisionCommand(
            key=f"k{n}",
            transfer_id=f"forged{n}",
            device=str(site.device),
            approval=approval,
            image_digest=digest,
            size=site.image.stat().st_size,
            quote_nonce=nonce,
        )
        reply = ctl_request(site.url, subjects.ctl_command("inst1", "provision"), encode(cmd))
        assert reply["ok"] is False and reply["code"] == "attestation", reply
        assert ("did not make or already used" if nonce else "no quote preceded") in str(
            reply["error"]
        )
    # A genuine quote, used once by a real provision, cannot be used again.
    quote = QuoteCommand(nonce=os.urandom(32))
    assert ctl_request(site.url, subjects.ctl_command("inst1", "quote"), encode(quote))["ok"]
    cmd = ProvisionCommand(
        key="k-stale",
        transfer_id="wrongpcrs",
        device=str(site.device),
        approval=approval,
        image_digest=digest,
        size=site.image.stat().st_size,
        quote_nonce=quote.nonce,
    )
    first = ctl_request(site.url, subjects.ctl_command("inst1", "provision"), encode(cmd))
    assert first["ok"] is True, first  # the installer now waits for the stream
    ok(run_cli("send", str(site.image), "--id", "wrongpcrs", "--data-url", site.url))
    cmd2 = msgspec.structs.replace(cmd, key="k-again", transfer_id="again")
    again = ctl_request(site.url, subjects.ctl_command("inst1", "provision"), encode(cmd2))
    assert again["ok"] is False and "already used" in str(again["error"]), again
    assert before != sha256_file(site.device)  # the one genuine provision wrote


def test_an_approval_bound_to_another_machine_is_refused(site: Site, tmp_path: Path) -> None:
    site.enroll()
    attestation = site.attestation()
    doc = json.loads(attestation.read_text())
    doc["ak_name"] = "000b" + "11" * 32  # another machine's AK
    attestation.write_text(json.dumps(doc))
    before = sha256_file(site.device)
    code, line = site.provision(site.approve("other", "--attestation", str(attestation)))
    assert_refused_and_untouched(site, before, code, line, "bound to attestation key 000b1111")


def test_an_approval_bound_to_other_pcrs_is_refused(site: Site) -> None:
    site.enroll()
    attestation = site.attestation()
    doc = json.loads(attestation.read_text())
    doc["pcr_digest"] = "ab" * 32
    attestation.write_text(json.dumps(doc))
    before = sha256_file(site.device)
    code, line = site.provision(site.approve("other", "--attestation", str(attestation)))
    assert_refused_and_untouched(site, before, code, line, "boot PCRs differ")


def test_a_failed_stream_leaves_the_machine_in_the_installer(site: Site, tmp_path: Path) -> None:
    """A provision asked to reboot, but its stream is not the approved image: it fails,
    and the installer neither reboots nor stops."""
    src = site.image
    approval = msgspec.json.decode(site.approve("good").read_bytes(), type=Approval)
    evil = tmp_path / "evil.raw"
    make_image(evil, src.stat().st_size, [(0, src.stat().st_size)], seed=99)
    digest = ok(run_cli("digest", str(src))).split()[0]
    cmd = ProvisionCommand(
        key="reboot-1",
        transfer_id="evilreboot",
        device=str(site.device),
        approval=approval,
        image_digest=digest,
        size=src.stat().st_size,
        then="reboot",
    )
    reply = ctl_request(site.url, subjects.ctl_command("inst1", "provision"), encode(cmd))
    assert reply["ok"] is True, reply
    sent = run_cli("send", str(evil), "--id", "evilreboot", "--data-url", site.url)
    assert sent.returncode == 1
    wait_for(
        lambda: any(
            e["state"] == "failed" and e["node"] == "inst1"
            for e in stored_events(site.url, "transfer")
        ),
        "the installer's failure event",
    )
    assert site.inst.proc.poll() is None and not site.then.exists()
    info = ctl_request(site.url, subjects.ctl_query("inst1", "info"), b"{}")
    assert info["state"] == "up"


def test_reboot_is_refused_by_an_installer_without_a_then_file(
    url: str, tmp_path: Path, start_agent: Callable[..., AgentProc]
) -> None:
    keys = tmp_path / "trusted"
    keys.mkdir()
    ok(run_cli("approve", "--new-key", str(tmp_path / "ops")))
    shutil.copy(tmp_path / "ops.pub", keys / "ops.pub")
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "vda").write_bytes(bytes(MiB))
    image = tmp_path / "i.raw"
    make_image(image, MiB, [(0, MiB)], seed=3)
    start_agent("images", url, "--allow", str(tmp_path))
    start_agent(
        "inst1", url, "--role", "installer", "--trusted-keys", str(keys), "--allow", str(dev)
    )
    approval = tmp_path / "a.json"
    for_it = ("--node", "inst1", "--device", str(dev / "vda"), "--image", str(image))
    ok(run_cli("approve", "--key", str(tmp_path / "ops.key"), *for_it, "-o", str(approval)))
    proc = ctl(
        url,
        "provision",
        f"images:{image}",
        f"inst1:{dev / 'vda'}",
        "--approval",
        str(approval),
        "--then",
        "reboot",
    )
    assert proc.returncode == 1 and "has no --then-file" in one_line_error(proc)
    assert (dev / "vda").read_bytes() == bytes(MiB)


def test_an_enrollment_is_stored_under_the_node_asked_not_the_name_it_claims(
    site: Site, tmp_path: Path
) -> None:
    """A node answering for inst2 with a genuine TPM of its own claims to be inst1 in its
    answer: it is enrolled as inst2, and inst1's enrollment is not touched."""
    other = SwtpmProc(tmp_path / "tpm-other")
    mine = Tpm(tmp_path / "w2", tcti=other.tcti)

    async def pose() -> None:
        import nats

        nc = await nats.connect(site.url)
        found = await mine.identity()

        async def identity(msg: object) -> None:
            reply = TpmIdentity(
                ok=True,
                node="inst1",
                ek_certificate=found.ek_certificate,
                ek_public=found.ek_public,
                ak_public=found.ak_public,
            )
            await msg.respond(encode(reply))  # type: ignore[attr-defined]

        async def activate(msg: object) -> None:
            cmd = msgspec.json.decode(msg.data, type=ActivateCommand)  # type: ignore[attr-defined]
            secret = await mine.activate(cmd.credential, cmd.secret)
            await msg.respond(encode(ActivateReply(ok=True, secret=secret)))  # type: ignore[attr-defined]

        await nc.subscribe(subjects.ctl_query("inst2", "tpm"), cb=identity)
        await nc.subscribe(subjects.ctl_command("inst2", "activate"), cb=activate)
        await nc.flush()
        proc = await asyncio.to_thread(
            ctl, site.url, "enroll", "inst2", "--ek-ca", str(other.ca_bundle), *site.store
        )
        await nc.close()
        assert proc.returncode == 0, proc.stderr

    try:
        asyncio.run(pose())
    finally:
        other.stop()
    assert json.loads((site.enrolled / "inst2.json").read_text())["node"] == "inst2"
    assert not (site.enrolled / "inst1.json").exists()
