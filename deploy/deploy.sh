#!/usr/bin/env bash
# Deploy a RustBalance node on a Debian host (see deploy/README.md).
#
#   deploy.sh --init  --endpoint HOST:PORT --target HOST:PORT [--priority N] [--passphrase-file F] [--tor-mode M] [--no-start]
#   deploy.sh --join  --endpoint HOST:PORT --token-file FILE|- [--priority N] [--passphrase-file F] [--tor-mode M] [--no-start]
#   deploy.sh --clean [--yes]
#
# Every run is idempotent. Secrets (join token, passphrase, keys) never appear on a command line:
# the token reaches `rustbalance join` on stdin, the passphrase as a file name, and everything
# under /etc/rustbalance is 0600 in a 0700 directory, owned by the service user `rustbalance`.
# --tor-mode managed (default): the node runs its own tor, unprivileged, inside the unit's
# sandbox; system: it attaches to tor@default, still unprivileged: deploy/system-tor.conf runs
# `rustbalance prepare` as root before it, and a polkit rule lets it restart tor@default.
# --no-start installs and configures everything but starts nothing (edit the config first).
#
# All paths are relative to $RB_ROOT (default /) so the tests can run the whole script against a
# scratch directory with apt-get, dpkg-query, python3, systemctl, ip, modprobe and the user and
# ownership tools (getent, useradd, userdel, chown) replaced by stubs on PATH; the script itself
# runs for real under systemd in tests/systemd/test_container.py.
set -euo pipefail

readonly WG_IF=wg-rb
readonly UNIT=rustbalance.service
readonly SERVICE_USER=rustbalance
readonly BASE_PACKAGES=(tor wireguard-tools python3-venv)
# System mode: polkitd, for the rule that lets the daemon restart tor@default.
readonly SYSTEM_TOR_PACKAGES=(polkitd)
readonly SYSTEM_TOR_DROPIN=system-tor.conf
readonly POLKIT_RULE_NAME=rustbalance-tor.rules
# What tor sees; the %include line names the directory, so tor loads every file in it.
readonly INCLUDE_LINE="%include /etc/tor/torrc.d/"
readonly MARKER="# rustbalance: deploy.sh added the next line; deploy.sh --clean removes it"
# The daemon owns torrc.d/rustbalance.conf (it rewrites it at every start with the onion service),
# so our static tor settings live in their own file.
readonly BASE_CONF_NAME=rustbalance-base.conf
readonly DAEMON_CONF_NAME=rustbalance.conf
# System mode: tor@default reaches the proxy's unix socket (proxy.listen_unix's default under the
# unit). Debian runs that tor confined (AppArmorProfile=-system_tor), and connecting to a unix
# socket needs "w" on its path (apparmor.d(5)); the profile includes local/system_tor for
# additions of the site.
readonly APPARMOR_RULE="/run/rustbalance/proxy.sock rw,"

ROOT="${RB_ROOT:-/}"
R="${ROOT%/}" # "" for "/", so "$R/etc" is "/etc"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC_DIR="$(dirname "$SCRIPT_DIR")"

CONF_DIR="$R/etc/rustbalance"
STATE_DIR="$R/var/lib/rustbalance"
OPT_DIR="$R/opt/rustbalance"
VENV="$OPT_DIR/venv"
TORRC="$R/etc/tor/torrc"
TORRC_D="$R/etc/tor/torrc.d"
HS_DIR="$R/var/lib/tor/rustbalance_node_hs"
UNIT_FILE="$R/etc/systemd/system/$UNIT"
DROPIN_DIR="$R/etc/systemd/system/$UNIT.d"
WG_CONF="$R/etc/wireguard/$WG_IF.conf"
POLKIT_RULE="$R/etc/polkit-1/rules.d/50-$POLKIT_RULE_NAME"
APPARMOR_PROFILE="$R/etc/apparmor.d/system_tor"
APPARMOR_LOCAL="$R/etc/apparmor.d/local/system_tor"

MODE=""
ENDPOINT=""
TARGET=""
PRIORITY=""
TOKEN_FILE=""
PASSPHRASE_FILE=""
TOR_MODE=managed
NO_START=0
ASSUME_YES=0

log() { printf 'deploy: %s\n' "$*"; }
die() {
    printf 'deploy: error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'deploy: %s\n' "$*" >&2
    sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^# */usage: /' >&2
    exit 2
}

set_mode() {
    [[ -z "$MODE" ]] || usage_error "choose one of --init, --join, --clean"
    MODE="$1"
}

need_value() {
    # $1 option, $2 number of remaining arguments including the option itself
    [[ "$2" -ge 2 ]] || usage_error "$1 needs a value"
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --init) set_mode init ;;
        --join) set_mode join ;;
        --clean) set_mode clean ;;
        --endpoint) need_value "$1" $# && ENDPOINT="$2" && shift ;;
        --target) need_value "$1" $# && TARGET="$2" && shift ;;
        --priority) need_value "$1" $# && PRIORITY="$2" && shift ;;
        --token-file) need_value "$1" $# && TOKEN_FILE="$2" && shift ;;
        --passphrase-file) need_value "$1" $# && PASSPHRASE_FILE="$2" && shift ;;
        --tor-mode) need_value "$1" $# && TOR_MODE="$2" && shift ;;
        --yes) ASSUME_YES=1 ;;
        --no-start) NO_START=1 ;;
        --token | --token=* | --passphrase | --passphrase=* | --master-key | --master-key=* | \
            --cluster-token | --cluster-token=* | --join-secret | --join-secret=*)
            # The original script took these in argv, where ps, shell history and logs see them.
            # (--cluster-token and --join-secret name protocol v2 secrets: refused here rather
            # than as an unknown argument, whose message would echo a --flag=SECRET.)
            usage_error "${1%%=*}: secrets are never taken on the command line; use --token-file FILE (or - for stdin) and --passphrase-file FILE"
            ;;
        -h | --help)
            sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) usage_error "unknown argument: $1" ;;
        esac
        shift
    done
    [[ -n "$MODE" ]] || usage_error "one of --init, --join, --clean is required"
    if [[ "$MODE" != clean ]]; then
        [[ -n "$ENDPOINT" ]] || usage_error "--$MODE needs --endpoint HOST:PORT (the WireGuard endpoint peers reach)"
        [[ -z "$PRIORITY" || "$PRIORITY" =~ ^[0-9]+$ ]] || usage_error "--priority must be a number"
        [[ "$TOR_MODE" == managed || "$TOR_MODE" == system ]] || usage_error "--tor-mode must be managed or system"
        if [[ -n "$PASSPHRASE_FILE" && ! -r "$PASSPHRASE_FILE" ]]; then
            usage_error "cannot read --passphrase-file $PASSPHRASE_FILE"
        fi
    fi
    if [[ "$MODE" == init ]]; then
        [[ -n "$TARGET" ]] || usage_error "--init needs --target HOST:PORT (the service to balance)"
    fi
    if [[ "$MODE" == join ]]; then
        [[ -n "$TOKEN_FILE" ]] || usage_error "--join needs --token-file FILE (or - to read the token from stdin)"
        if [[ "$TOKEN_FILE" != - && ! -r "$TOKEN_FILE" ]]; then
            usage_error "cannot read --token-file $TOKEN_FILE"
        fi
    fi
    return 0
}

# sd_booted(3): systemd is PID 1 when /run/systemd/system exists. Under a scratch RB_ROOT the
# tests create it to exercise the systemd path.
systemd_running() { [[ -d "$R/run/systemd/system" ]]; }

# Write $2 (content) to $1 with mode $3 only when it differs; returns 0 if the file changed.
# The temporary file starts with a dot so tor's directory %include never loads it half-written.
write_if_changed() {
    local path="$1" content="$2" mode="$3" tmp
    if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
        chmod "$mode" "$path"
        return 1
    fi
    tmp="$(mktemp "$(dirname "$path")/.$(basename "$path").XXXXXX")"
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    return 0
}

PACKAGES=()
packages_installed() {
    local package status
    for package in "${PACKAGES[@]}"; do
        status="$(dpkg-query -W -f '${db:Status-Status}' "$package" 2>/dev/null)" || return 1
        [[ "$status" == installed ]] || return 1
    done
}

install_packages() {
    PACKAGES=("${BASE_PACKAGES[@]}")
    [[ "$TOR_MODE" != system ]] || PACKAGES+=("${SYSTEM_TOR_PACKAGES[@]}")
    # A re-run needs no package index (and no network) when everything is there already.
    if packages_installed; then
        log "Debian packages already installed: ${PACKAGES[*]}"
    else
        log "installing Debian packages: ${PACKAGES[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}"
    fi
    # The unit sets ProtectKernelModules=yes, so the daemon cannot trigger the module load itself.
    if ! modprobe wireguard; then
        log "warning: could not load the wireguard kernel module; WireGuard setup may fail"
    fi
}

make_private_dir() {
    install -d -m 0700 "$1"
    chmod 0700 "$1" # install -d leaves an existing directory's mode alone
}

# 3.3: every file under the config and state directories is 0600, every directory 0700,
# whatever umask the tool that wrote them had, and all of it belongs to the service user: the
# daemon reads its config and keys as that user (the unit mounts /etc/rustbalance read-only).
# -P: a symlink in there is changed itself, never what it points to.
lock_down() {
    local dir
    for dir in "$CONF_DIR" "$STATE_DIR"; do
        [[ -d "$dir" ]] || continue
        find "$dir" -type d -exec chmod 0700 {} +
        find "$dir" -type f -exec chmod 0600 {} +
        chown -R -P "$SERVICE_USER:$SERVICE_USER" "$dir"
    done
}

# The daemon's own system user (no login, no home of its own: its home is the state folder).
ensure_service_user() {
    if getent passwd "$SERVICE_USER" >/dev/null; then
        return 0
    fi
    useradd --system --user-group --home-dir /var/lib/rustbalance --no-create-home \
        --shell /usr/sbin/nologin --comment "RustBalance daemon" "$SERVICE_USER"
    log "created system user $SERVICE_USER"
}

create_dirs() {
    make_private_dir "$CONF_DIR"
    make_private_dir "$STATE_DIR"
    install -d -m 0755 "$TORRC_D" "$(dirname "$UNIT_FILE")"
    if [[ "$TOR_MODE" == system ]]; then
        make_private_dir "$HS_DIR"
        # tor refuses a HiddenServiceDir it does not own; `rustbalance prepare` (root, before
        # the daemon) writes the keys into it and hands them to debian-tor.
        if getent passwd debian-tor >/dev/null && ! chown debian-tor:debian-tor "$HS_DIR"; then
            # Only a scratch RB_ROOT run by a non-root user may get here.
            [[ -n "$R" ]] || die "cannot chown $HS_DIR to debian-tor"
            log "warning: could not chown $HS_DIR to debian-tor"
        fi
    fi
}

install_venv() {
    install -d -m 0755 "$OPT_DIR"
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    log "installing rustbalance from $SRC_DIR"
    "$VENV/bin/pip" install --quiet --upgrade "$SRC_DIR"
}

TOR_CHANGED=0

configure_tor() {
    local base
    if [[ "$TOR_MODE" == system ]]; then
        base="# Written by rustbalance deploy.sh; deploy.sh --clean removes it.
# The daemon reaches tor here; the onion service itself is in $DAEMON_CONF_NAME (daemon-owned).
# Debian's tor-service-defaults-torrc sets CookieAuthFile /run/tor/control.authcookie; the
# group-readable flag only works with that explicit path.
SocksPort 9050
ControlPort 9051
CookieAuthentication 1
CookieAuthFileGroupReadable 1"
    else
        base="# Written by rustbalance deploy.sh; deploy.sh --clean removes it.
# The node runs its own tor (tor.mode = managed); the system tor only gives rustbalance join
# a SOCKS port to reach the master onion. No control port: nothing needs one.
SocksPort 9050"
    fi
    # 0644: tor re-reads its configuration as debian-tor on reload; nothing secret in here.
    if write_if_changed "$TORRC_D/$BASE_CONF_NAME" "$base" 0644; then
        TOR_CHANGED=1
    fi
    [[ -f "$TORRC" ]] || install -m 0644 /dev/null "$TORRC"
    # An operator's own include of the directory (or of *.conf in it) already loads our file.
    if ! grep -Eq '^[[:space:]]*%include[[:space:]]+/etc/tor/torrc\.d/?(\*|\*\.conf)?[[:space:]]*$' "$TORRC"; then
        if [[ -s "$TORRC" && -n "$(tail -c 1 "$TORRC")" ]]; then
            printf '\n' >>"$TORRC" # the last line had no newline
        fi
        printf '%s\n%s\n' "$MARKER" "$INCLUDE_LINE" >>"$TORRC"
        TOR_CHANGED=1
        log "added '$INCLUDE_LINE' to $TORRC"
    fi
}

restart_tor() {
    if systemd_running; then
        systemctl restart tor@default.service || systemctl restart tor.service
    else
        log "systemd is not PID 1: not restarting tor (would run: systemctl restart tor@default.service)"
    fi
}

UNIT_CHANGED=0

install_unit() {
    if write_if_changed "$UNIT_FILE" "$(cat "$SCRIPT_DIR/$UNIT")" 0644; then
        UNIT_CHANGED=1
    fi
    local dropin="$DROPIN_DIR/$SYSTEM_TOR_DROPIN"
    if [[ "$TOR_MODE" == system ]]; then
        install -d -m 0755 "$DROPIN_DIR"
        if write_if_changed "$dropin" "$(cat "$SCRIPT_DIR/$SYSTEM_TOR_DROPIN")" 0644; then
            UNIT_CHANGED=1
        fi
    elif [[ -e "$dropin" ]]; then
        rm -f "$dropin"
        rmdir --ignore-fail-on-non-empty "$DROPIN_DIR"
        UNIT_CHANGED=1
    fi
    # The daemon (unprivileged) restarts tor@default through systemctl: polkit allows exactly
    # that unit to the rustbalance user. polkitd reads rules.d by itself (inotify).
    if [[ "$TOR_MODE" == system ]]; then
        install -d -m 0755 "$(dirname "$POLKIT_RULE")"
        write_if_changed "$POLKIT_RULE" "$(cat "$SCRIPT_DIR/$POLKIT_RULE_NAME")" 0644 || true
    else
        rm -f "$POLKIT_RULE"
    fi
}

# Load the changed profile into the kernel (a running tor gets it at once); only where AppArmor
# is on and its parser installed.
reload_apparmor() {
    if systemd_running && [[ -f "$APPARMOR_PROFILE" && -d /sys/kernel/security/apparmor ]] &&
        command -v apparmor_parser >/dev/null; then
        apparmor_parser --replace "$APPARMOR_PROFILE" || log "warning: could not reload $APPARMOR_PROFILE"
    fi
}

configure_apparmor() {
    if [[ "$TOR_MODE" != system ]]; then
        remove_marked_line "$APPARMOR_LOCAL" "$APPARMOR_RULE" && reload_apparmor
        return 0
    fi
    [[ -d "$(dirname "$APPARMOR_LOCAL")" ]] || return 0 # no AppArmor here
    if [[ -f "$APPARMOR_LOCAL" ]] && grep -qxF "$APPARMOR_RULE" "$APPARMOR_LOCAL"; then
        return 0
    fi
    [[ -f "$APPARMOR_LOCAL" ]] || install -m 0644 /dev/null "$APPARMOR_LOCAL"
    if [[ -s "$APPARMOR_LOCAL" && -n "$(tail -c 1 "$APPARMOR_LOCAL")" ]]; then
        printf '\n' >>"$APPARMOR_LOCAL" # the last line had no newline
    fi
    printf '%s\n%s\n' "$MARKER" "$APPARMOR_RULE" >>"$APPARMOR_LOCAL"
    log "allowed tor the proxy's socket in $APPARMOR_LOCAL"
    reload_apparmor
}

start_service() {
    if [[ "$NO_START" == 1 ]]; then
        log "--no-start: not starting anything; when the config is ready run:"
        log "systemctl daemon-reload && systemctl enable --now $UNIT"
        return 0
    fi
    if ! systemd_running; then
        log "systemd is not PID 1: not starting anything"
        log "on a systemd host this runs: systemctl daemon-reload && systemctl enable --now $UNIT"
        return 0
    fi
    systemctl daemon-reload
    if systemctl is-active --quiet "$UNIT"; then
        systemctl restart "$UNIT" # pick up the freshly installed code
    else
        systemctl enable --now "$UNIT"
    fi
}

# The CLI writes keys and tokens: no window in which they are readable by others.
run_cli() { (umask 0077 && "$VENV/bin/rustbalance" "$@"); }

cli_args=()
common_cli_args() {
    cli_args=(--config-dir "$CONF_DIR" --endpoint "$ENDPOINT" --tor-mode "$TOR_MODE")
    [[ -z "$PRIORITY" ]] || cli_args+=(--priority "$PRIORITY")
    # A file name, not the passphrase: argv is world-readable in /proc.
    [[ -z "$PASSPHRASE_FILE" ]] || cli_args+=(--passphrase-file "$PASSPHRASE_FILE")
}

run_init() {
    if [[ -f "$CONF_DIR/config.toml" ]]; then
        log "$CONF_DIR/config.toml exists: node already initialised, keeping its keys"
        return 0
    fi
    common_cli_args
    run_cli init "${cli_args[@]}" --target "$TARGET"
    log "join token written to $CONF_DIR/join-token.txt (0600); copy it to the new node over a"
    log "secure channel and run: deploy.sh --join --endpoint HOST:PORT --token-file FILE"
}

run_join() {
    if [[ -f "$CONF_DIR/config.toml" ]]; then
        log "$CONF_DIR/config.toml exists: node already joined, not joining again"
        return 0
    fi
    if [[ "$TOKEN_FILE" != - ]] && [[ -n "$(find "$TOKEN_FILE" -maxdepth 0 -perm /o+r)" ]]; then
        log "warning: $TOKEN_FILE is world-readable; delete it once the node has joined"
    fi
    common_cli_args
    # The token travels on stdin only (W1): never in argv, never in a file we create.
    if [[ "$TOKEN_FILE" == - ]]; then
        run_cli join "${cli_args[@]}" --token-file -
    else
        run_cli join "${cli_args[@]}" --token-file - <"$TOKEN_FILE"
    fi
}

deploy() {
    if [[ -z "$R" && "$(id -u)" != 0 ]]; then
        die "run as root"
    fi
    # Standard modes for the venv and system directories; every secret-bearing path gets an
    # explicit mode, and the CLI runs under umask 0077 (see run_cli).
    umask 0022
    install_packages
    ensure_service_user
    create_dirs
    install_venv
    # A managed node needs the system tor only to join (its SOCKS port reaches the master onion).
    if [[ "$TOR_MODE" == system || "$MODE" == join ]]; then
        configure_tor
    fi
    install_unit
    configure_apparmor
    if [[ "$MODE" == init ]]; then run_init; else run_join; fi
    lock_down
    [[ "$TOR_CHANGED" == 0 ]] || restart_tor
    [[ "$UNIT_CHANGED" == 0 ]] || log "installed $UNIT_FILE"
    start_service
}

# remove_marked_line FILE LINE: drop our marker and LINE right after it; other lines stay.
# Status 1 when there was nothing to remove.
remove_marked_line() {
    local file="$1" line="$2" tmp
    [[ -f "$file" ]] || return 1
    grep -qxF "$MARKER" "$file" || return 1
    tmp="$(mktemp "$(dirname "$file")/.rustbalance.XXXXXX")"
    awk -v marker="$MARKER" -v line="$line" '
        skip { skip = 0; if ($0 == line) next }
        $0 == marker { skip = 1; next }
        { print }
    ' "$file" >"$tmp"
    cat "$tmp" >"$file" # keep the file's inode, owner and mode
    rm -f "$tmp"
    log "removed '$line' from $file"
}

remove_include_line() { remove_marked_line "$TORRC" "$INCLUDE_LINE" || true; }

clean() {
    if [[ -z "$R" && "$(id -u)" != 0 ]]; then
        die "run as root"
    fi
    if [[ "$ASSUME_YES" != 1 ]]; then
        [[ -t 0 ]] || die "--clean deletes this node's keys; pass --yes to confirm"
        local answer
        read -r -p "Delete this RustBalance node (keys, config, WireGuard, tor settings)? [y/N] " answer
        [[ "$answer" == [yY]* ]] || die "aborted"
    fi
    if systemd_running; then
        systemctl disable --now "$UNIT" || true
        systemctl disable --now "wg-quick@$WG_IF.service" || true
    else
        log "systemd is not PID 1: not stopping anything (would run: systemctl disable --now $UNIT)"
    fi
    rm -f "$UNIT_FILE" "$DROPIN_DIR/$SYSTEM_TOR_DROPIN" "$POLKIT_RULE"
    [[ ! -d "$DROPIN_DIR" ]] || rmdir --ignore-fail-on-non-empty "$DROPIN_DIR"
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT" || true
    fi
    if ip link show dev "$WG_IF" >/dev/null 2>&1; then
        ip link delete dev "$WG_IF"
        log "deleted interface $WG_IF"
    fi
    rm -f "$WG_CONF"
    rm -f "$TORRC_D/$BASE_CONF_NAME" "$TORRC_D/$DAEMON_CONF_NAME"
    remove_include_line
    if remove_marked_line "$APPARMOR_LOCAL" "$APPARMOR_RULE"; then reload_apparmor; fi
    [[ ! -d "$TORRC_D" ]] || rmdir --ignore-fail-on-non-empty "$TORRC_D"
    rm -rf "$HS_DIR" "$CONF_DIR" "$STATE_DIR" "$VENV"
    [[ ! -d "$OPT_DIR" ]] || rmdir --ignore-fail-on-non-empty "$OPT_DIR"
    if getent passwd "$SERVICE_USER" >/dev/null; then
        userdel "$SERVICE_USER"
        log "deleted system user $SERVICE_USER"
    fi
    restart_tor || log "warning: could not restart tor"
    log "clean: done (the Debian packages ${BASE_PACKAGES[*]} and ${SYSTEM_TOR_PACKAGES[*]} stay installed)"
}

main() {
    parse_args "$@"
    case "$MODE" in
    init | join) deploy ;;
    clean) clean ;;
    esac
}

main "$@"
