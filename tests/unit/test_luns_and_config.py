"""LUN addresses (target=, lun=), the supervisor's LUN table (slots, the shared state
page), the configuration file and the LUN field of events."""
from __future__ import annotations

import pytest

from vscsid import lunstate
from vscsid.cli import _option_table, build_parser, parse_config, read_config_file
from vscsid.config import ConfigError, LunSpec
from vscsid.configfile import load
from vscsid.supervisor.luns import LunTable, options_text, parse_address
from vscsid.supervisor.osops import OsOps
from vscsid.virtio.scsi_wire import (
    LUN_BAD_TARGET, WLUN_REPORT_LUNS, decode_address, decode_lun, encode_event_lun,
)


def test_lun_spec_takes_a_target_and_a_lun():
    s = LunSpec.parse("a.img,target=3,lun=7,ro")
    assert (s.target, s.lun, s.readonly) == (3, 7, True)
    assert LunSpec.parse("a.img").lun is None and LunSpec.parse("a.img").target == 0
    for bad in ("a.img,target=256", "a.img,lun=256", "a.img,lun=-1", "a.img,target=x"):
        with pytest.raises(ConfigError):
            LunSpec.parse(bad)


def test_serials_of_target_0_are_what_they_were():
    s = LunSpec.parse("/var/lib/a.img")
    assert s.effective_serial(1) == s.effective_serial(1, 0)
    assert s.effective_serial(1, 0) != s.effective_serial(1, 2)


@pytest.mark.parametrize("text,addr", [("0:1", (0, 1)), ("5", (0, 5)), (" 2:255 ", (2, 255))])
def test_parse_address(text, addr):
    assert parse_address(text) == addr


@pytest.mark.parametrize("text", ["", "a", "1:", ":1", "256:0", "0:256", "1:2:3", "-1:0"])
def test_bad_addresses(text):
    with pytest.raises(ConfigError):
        parse_address(text)


def _table(tmp_path, *specs):
    """A LunTable of ``specs``; FILE stands for a fresh 1 MiB image per spec."""
    out = []
    for i, text in enumerate(specs):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(bytes(1 << 20))
        out.append(LunSpec.parse(text.replace("FILE", str(p))))
    return LunTable(tuple(out), OsOps())


def test_explicit_addresses_first_then_the_next_free_lun(tmp_path):
    t = _table(tmp_path, "FILE", "FILE,lun=0", "FILE,target=1", "FILE,writethrough")
    try:
        assert [(x.target, x.lun) for x in t.luns()] == [(0, 0), (0, 1), (0, 2), (1, 0)]
        assert t.targets() == {0, 1}
        x = t.find(0, 2)
        assert x.spec.writethrough and not t.write_cache(x)
        assert t.write_cache(t.find(0, 0))
        # every new LUN starts with POWER ON pending, its own record
        assert all(t.pending_unit_attentions(x) == ["power_on"] for x in t.luns())
        with pytest.raises(ConfigError):
            t.open(LunSpec.parse("null:1M,lun=1"))
        lun = t.open(LunSpec.parse("null:1M,target=1"))
        assert (lun.target, lun.lun) == (1, 1)
        t.establish_all(lunstate.UA_LUNS_CHANGED, target=1)
        assert t.pending_unit_attentions(lun) == ["power_on", "reported_luns_changed"]
        assert t.pending_unit_attentions(t.find(0, 0)) == ["power_on"]
        slot = lun.slot
        t.discard(lun)
        assert t.find(1, 1) is None
        assert t.state_mm[slot * lunstate.RECORD:(slot + 1) * lunstate.RECORD] == bytes(8)
        again = t.open(LunSpec.parse("null:2M"))
        assert again.slot == slot and (again.target, again.lun) == (0, 3)
    finally:
        t.close()


def test_the_state_page_holds_every_slot():
    from vscsid.config import MAX_LUNS
    assert lunstate.MAX_SLOTS >= MAX_LUNS
    assert lunstate.ua_offset(MAX_LUNS - 1, lunstate.UA_KINDS - 1) < lunstate.PAGE_SIZE
    assert lunstate.ua_offset(0) % 4 == 0          # the C fast path loads the 4 bytes at once


def test_options_text_round_trips(tmp_path):
    for text in ("ro", "blocksize=4096", "cache=none", "cache=directsync", "cache=writethrough",
                 "discard=off", "rotational", "delay_us=10", "aio=sync", "serial=X1",
                 "vendor=ACME", "product=Disk"):
        spec = LunSpec.parse(f"a.img,{text}")
        assert options_text(spec) == text
        assert LunSpec.parse(f"a.img,{options_text(spec)}") == spec
    assert options_text(LunSpec.parse("a.img")) == ""


def test_event_lun_field_is_the_report_luns_encoding():
    assert encode_event_lun(0, 1) == bytes((1, 0, 0, 1, 0, 0, 0, 0))
    assert encode_event_lun(3, 300) == bytes((1, 3, 0x41, 0x2C, 0, 0, 0, 0))
    # (Linux takes lun[2] << 8 | lun[3]: for LUNs below 256 that is the LUN number)
    for target, lun in ((0, 0), (7, 255), (255, 16383)):
        assert decode_address(encode_event_lun(target, lun)) == (target, lun)


def test_decode_address_gives_the_target():
    assert decode_address(bytes((1, 9, 0x40, 3, 0, 0, 0, 0))) == (9, 3)
    assert decode_address(bytes((0xC1, 1, 0, 0, 0, 0, 0, 0))) == (0, WLUN_REPORT_LUNS)
    assert decode_address(bytes(8))[0] == LUN_BAD_TARGET
    assert decode_lun(bytes((1, 9, 0x40, 3, 0, 0, 0, 0))) == LUN_BAD_TARGET
    assert decode_lun(bytes((1, 9, 0x40, 3, 0, 0, 0, 0)), 9) == 3


def _conf(tmp_path, text: str) -> str:
    p = tmp_path / "v.toml"
    p.write_text(text)
    return str(p)


def test_config_file_is_the_command_line(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    path = _conf(tmp_path, f'''
socket-path = "{tmp_path}/s.sock"
num_queues = 3
quiet = true
poll-us = 0
lun = ["{img},ro"]

[[luns]]
path = "{img}"
target = 1
lun = 4
cache = "none"
discard = false
''')
    argv, luns = load(path, _option_table(build_parser()))
    assert argv == ["--socket-path", f"{tmp_path}/s.sock", "--num-queues", "3", "--quiet",
                    "--poll-us", "0"]
    assert luns == [f"{img},ro", f"{img},target=1,lun=4,cache=none,discard=off"]
    cfg, args = parse_config(["--config", path, "--num-queues", "2"])   # the command line wins
    assert cfg.num_queues == 2 and cfg.poll_us == 0 and args.quiet
    assert cfg.luns == () and [s.lun for s in cfg.config_luns] == [None, 4]
    assert cfg.admin_socket == f"{tmp_path}/s.sock.ctl" and cfg.config_file == path


@pytest.mark.parametrize("text,error", [
    ("num-queues = 2\nbogus = 1\n", "unknown setting"),
    ("quiet = 1\n", "is a switch"),
    ("num-queues = [1]\n", "string or a number"),
    ("config = 'x'\n", "unknown setting"),
    ("lun = [{ro = true}]\n", "needs path"),
    ("lun = [{path = 'a', serial = 'x,ro'}]\n", "no ','"),
    ("lun = [3]\n", "a string or a table"),
    ("lun = [\n", "configuration file"),
])
def test_bad_config_files(tmp_path, text, error):
    with pytest.raises(ConfigError, match=error):
        load(_conf(tmp_path, text), _option_table(build_parser()))


def test_a_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "nope.toml"), _option_table(build_parser()))


def test_config_if_exists(tmp_path, monkeypatch):
    """The packaged unit's ``--config-if-exists /etc/vscsid/NAME.toml``: no file is no
    error (the default image serves), a file is read as --config reads it."""
    path = str(tmp_path / "vm1.toml")
    image = tmp_path / "default.img"
    cfg, _ = parse_config(["--socket-path", str(tmp_path / "s.sock"), "--config-if-exists", path,
                           "--default-image", str(image)])
    assert cfg.config_file == path and cfg.config_luns == ()
    assert [s.path for s in cfg.luns] == [str(image)] and image.stat().st_size > 0
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    _conf(tmp_path, "num-queues = 3\nlun = ['a.img']\n")
    cfg, _ = parse_config(["--socket-path", str(tmp_path / "s.sock"),
                           "--config-if-exists", str(tmp_path / "v.toml")])
    assert cfg.num_queues == 3 and [s.path for s in cfg.config_luns] == [str(tmp_path / "a.img")]
    with pytest.raises(SystemExit):          # one or the other
        parse_config(["--config", path, "--config-if-exists", path])


def test_a_reload_keeps_the_command_line_over_the_file(tmp_path):
    """At SIGHUP, as at start, the daemon's command line overrides the file's settings;
    the LUNs are the file's alone."""
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    path = _conf(tmp_path, "log-level = 'warning'\nnum-queues = 2\nlun = ['a.img']\n")
    args, specs = read_config_file(path, ["--fd", "3", "--config", path, "--log-level", "debug",
                                          "--lun", "null:1G"])
    assert args.log_level == "debug" and args.num_queues == 2
    assert [s.path for s in specs] == [str(tmp_path / "a.img")]
    args, _ = read_config_file(path)
    assert args.log_level == "warning"
