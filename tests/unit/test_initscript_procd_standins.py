"""files/etc/init.d/oe run by sh against RECORDING STAND-INS of rc.common and procd.sh.

procd, ubusd and libuci do not run on this host (no OpenWrt userland installs here), so
these tests cannot show that procd starts the daemon. What they do show: the real init
script, sourced by a real POSIX shell, makes the procd calls that OpenWrt's
/lib/functions/procd.sh would turn into the service description (instance command,
respawn, stdout/stderr to logd, reload trigger), and honours `enabled`. The stand-ins
follow OpenWrt's rc.common (start = rc_procd start_service; procd_close_service runs
service_triggers) and functions.sh (config_get_bool's accepted words). config_load's
UCI state is produced from a real UCI text by this project's own UCI parser, as libuci
would export it into CONFIG_<section>_<option> variables.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from oe_router.config.uci import parse

REPO = Path(__file__).resolve().parents[2]
INITSCRIPT = REPO / "files" / "etc" / "init.d" / "oe"

STANDINS = r"""
# --- recording stand-ins for /etc/rc.common, /lib/functions.sh, /lib/functions/procd.sh
rec() { printf '%s\n' "$*" >> "$RECORD"; }

config_load() { rec "config_load $1"; [ "$1" = oe ] && . "$UCI_STATE"; }
config_get() {
	local _var="$1" _sec="$2" _opt="$3" _def="$4" _val
	eval "_val=\"\${CONFIG_${_sec}_${_opt}-\$_def}\""
	eval "$_var=\"\$_val\""
}
config_get_bool() {
	local _tmp
	config_get _tmp "$2" "$3" "$4"
	case "$_tmp" in
		1|on|true|yes|enabled) _tmp=1 ;;
		0|off|false|no|disabled) _tmp=0 ;;
		*) _tmp="$4" ;;
	esac
	eval "$1=\"\$_tmp\""
}

config_foreach() {
	local _fn="$1" _type="$2" _sec _t
	for _sec in $CONFIG_SECTIONS; do
		eval "_t=\"\${CONFIG_${_sec}_TYPE}\""
		[ -z "$_type" ] || [ "$_t" = "$_type" ] || continue
		"$_fn" "$_sec"
	done
}

procd_open_service() { rec "procd_open_service $*"; }
procd_close_service() {
	rec "procd_open_trigger"
	service_triggers
	rec "procd_close_trigger"
	rec "procd_close_service${*:+ $*}"
}
procd_open_instance() { rec "procd_open_instance $*"; }
procd_set_param() {
	local _k="$1"; shift
	local _line="procd_set_param $_k" _a
	for _a in "$@"; do _line="$_line [$_a]"; done
	rec "$_line"
}
procd_close_instance() { rec "procd_close_instance"; }
procd_add_reload_trigger() { rec "procd_add_reload_trigger $*"; }
procd_add_reload_interface_trigger() { rec "procd_add_reload_interface_trigger $*"; }
procd_send_signal() { rec "procd_send_signal $*"; }
procd_kill() { rec "procd_kill $*"; }

rc_procd() {
	procd_open_service "$(basename "$initscript")" "$initscript"
	"$@"
	procd_close_service
}
start() { rc_procd start_service "$@"; }
stop() { type stop_service >/dev/null 2>&1 && stop_service "$@"; procd_kill oe "$1"; }
reload() {
	if type reload_service >/dev/null 2>&1; then reload_service "$@"; else start; fi
}
"""


def run_initscript(tmp_path: Path, action: str, uci_text: str) -> list[str]:
    """Source the init script like rc.common does and run `action`; return the calls."""
    sh = shutil.which("sh")
    assert sh is not None
    pkg = parse(uci_text, "/etc/config/oe")
    lines = []
    names = []
    for index, section in enumerate(pkg.sections):
        name = section.name or f"cfg{index:02x}"  # libuci names anonymous sections cfgXXXX
        names.append(name)
        lines.append(f"CONFIG_{name}_TYPE={shlex.quote(section.type)}")
        for option, value in section.options.items():
            lines.append(f"CONFIG_{name}_{option}={shlex.quote(value)}")
    lines.append(f"CONFIG_SECTIONS={shlex.quote(' '.join(names))}")
    state = tmp_path / "uci_state.sh"
    state.write_text("\n".join(lines) + "\n")
    standins = tmp_path / "rc_common_standins.sh"
    standins.write_text(STANDINS)
    record = tmp_path / "record"
    record.write_text("")
    script = f'. "{standins}"\ninitscript="{INITSCRIPT}"\n. "$initscript"\n{action}\n'
    proc = subprocess.run(
        [sh, "-eu", "-c", script],
        env={"RECORD": str(record), "UCI_STATE": str(state), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return record.read_text().splitlines()


ENABLED = """
config oe 'global'
\toption enabled '1'
\toption log_level 'info'
"""

DISABLED = """
config oe 'global'
\toption enabled 'no'
"""


def test_initscript_file_is_an_executable_procd_rc_common_script() -> None:
    text = INITSCRIPT.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert "\nUSE_PROCD=1\n" in text
    assert "\nSTART=" in text and "\nSTOP=" in text
    assert INITSCRIPT.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(INITSCRIPT)], check=True)


def test_start_with_standins_describes_one_respawning_instance_logging_to_logd(
    tmp_path: Path,
) -> None:
    calls = run_initscript(tmp_path, "start", ENABLED)
    assert calls[0] == f"procd_open_service oe {INITSCRIPT}"
    inst = calls.index("procd_open_instance oe-routerd")
    close = calls.index("procd_close_instance")
    params = calls[inst + 1 : close]
    assert "procd_set_param command [/usr/bin/oe-routerd] [--config] [/etc/config/oe]" in params
    assert "procd_set_param respawn [3600] [5] [5]" in params
    assert "procd_set_param stdout [1]" in params
    assert "procd_set_param stderr [1]" in params
    trig = calls.index("procd_open_trigger")
    assert calls[trig + 1] == "procd_add_reload_trigger oe"
    assert calls[-1] == "procd_close_service"


@pytest.mark.parametrize("word", ["0", "no", "off", "false", "disabled"])
def test_start_with_standins_and_enabled_off_starts_no_instance(tmp_path: Path, word: str) -> None:
    calls = run_initscript(tmp_path, "start", DISABLED.replace("'no'", f"'{word}'"))
    assert not any(c.startswith("procd_open_instance") for c in calls)
    # The service and its reload trigger stay registered, so enabling it later works.
    assert "procd_add_reload_trigger oe" in calls


def test_missing_enabled_option_defaults_to_on_with_standins(tmp_path: Path) -> None:
    calls = run_initscript(tmp_path, "start", "config oe 'global'\n\toption log_level 'debug'\n")
    assert "procd_open_instance oe-routerd" in calls


def test_anonymous_oe_section_with_standins_is_honoured(tmp_path: Path) -> None:
    text = "config dns 'dns'\n\toption hold_limit '2'\n\nconfig oe\n\toption enabled 'off'\n"
    calls = run_initscript(tmp_path, "start", text)
    assert not any(c.startswith("procd_open_instance") for c in calls)


def test_reload_with_standins_refreshes_the_instance_and_sends_hup(tmp_path: Path) -> None:
    calls = run_initscript(tmp_path, "reload", ENABLED)
    assert "procd_open_instance oe-routerd" in calls
    assert calls[-1] == "procd_send_signal oe oe-routerd HUP"


def test_reload_with_standins_when_disabled_drops_the_instance(tmp_path: Path) -> None:
    calls = run_initscript(tmp_path, "reload", DISABLED)
    assert not any(c.startswith("procd_open_instance") for c in calls)
    assert "procd_close_service" in calls  # procd replaces the instance set with none


def test_shipped_config_starts_the_instance_with_standins(tmp_path: Path) -> None:
    shipped = (REPO / "files" / "etc" / "config" / "oe").read_text()
    calls = run_initscript(tmp_path, "start", shipped)
    assert "procd_open_instance oe-routerd" in calls
