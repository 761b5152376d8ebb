#!/usr/bin/env bash
# The Ray user's path, end to end, on this machine: `ray up` (configs/cluster-local.yaml rendered for one
# head on 127.0.0.1, reached over SSH), `serve deploy configs/serve.yaml`, HTTP through the official
# `openai` client, a `ray job` that completes prompts with `ray.get` on the serving engines, `serve
# shutdown`, `ray down`, and a check that no Ray process, actor, placement group or listening port is left.
#
#   ./scripts/cluster_smoke.sh           # as root (it installs and starts sshd); about 2 minutes on 2 cores
#
# Each step prints its duration; a failing step prints its log tail, tears the cluster down (unless
# RAYLORA_SMOKE_KEEP=1) and exits 1. A rerun first cleans up whatever an earlier run left. Logs, the
# throwaway SSH key and the rendered cluster file live in $RAYLORA_SMOKE_DIR (~/.cache/raylora-cluster-smoke).
#
# Ports (127.0.0.1): 22 (the smoke's sshd), 6379 (GCS), 8265 (dashboard: jobs, Serve's REST API),
# 8000 (Serve HTTP), 10001 (Ray client), 52366 (dashboard agent). The script checks nothing holds them
# first. Other Ray instances on the machine (`ray.init()` in tests and benchmarks) keep their own random
# ports and temp dir and are left alone: `ray up` and `ray down` run `ray stop` on the head, which stops
# every Ray process it can see, so the head's sshd (and so everything Ray starts there) runs in a PID and
# mount namespace of its own (`unshare`), where `ray stop` sees this cluster only; the namespace also
# gives the head a private ~/.bashrc for the setup commands to edit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BIN=$REPO/.venv/bin
STATE=${RAYLORA_SMOKE_DIR:-$HOME/.cache/raylora-cluster-smoke}
LOGS=$STATE/logs
CLUSTER_NAME=raylora-smoke
CLUSTER_FILE=$STATE/cluster.yaml
KEY=$STATE/id_ed25519
RAY_TMP=/tmp/raylora-smoke-ray        # the head's Ray temp dir: ray.init() elsewhere never finds this cluster
AGENT_PORT=52366
RAY_PORTS="6379 8265 8000 10001 $AGENT_PORT"
DASHBOARD=http://127.0.0.1:8265
APP=raylora
SSH_OPTS=(-i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=5)
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

STEP=0
SUMMARY=()

now() { date +%s.%N; }

# step NAME [--show] COMMAND...: run COMMAND (a function or program) with its output in a log; print the
# duration; on failure print the log's tail, tear down and exit. --show prints the log after success too.
step() {
  local name=$1 show=0 rc log started took
  shift
  if [ "${1:-}" = --show ]; then show=1; shift; fi
  STEP=$((STEP + 1))
  log=$(printf '%s/%02d-%s.log' "$LOGS" "$STEP" "$name")
  printf '==> [%02d] %-24s ' "$STEP" "$name"
  started=$(now)
  set +e
  ( set -e; "$@" ) >"$log" 2>&1 &   # in the background, so that `set -e` holds inside the step
  wait $!
  rc=$?
  set -e
  took=$(awk -v a="$started" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  SUMMARY+=("$(printf '[%02d] %-24s %7ss  %s' "$STEP" "$name" "$took" "$([ $rc -eq 0 ] && echo ok || echo FAILED)")")
  if [ $rc -eq 0 ]; then
    printf 'ok      %7ss\n' "$took"
    if [ $show -eq 1 ]; then  # the step's own lines, without Ray's CLI logging and actors' log lines
      grep -avE $'^[0-9]{4}-[0-9]{2}-[0-9]{2} |^\e\\[36m\\(|Shared connection' "$log" | sed 's/^/     | /' || true
    fi
    return 0
  fi
  printf 'FAILED  %7ss (exit %d)\n' "$took" "$rc"
  echo "---- last 40 lines of $log"
  tail -n 40 "$log"
  echo "----"
  if [ "${RAYLORA_SMOKE_KEEP:-0}" = 1 ]; then
    echo "RAYLORA_SMOKE_KEEP=1: the cluster is left running for inspection; a rerun cleans it up"
  else
    printf '==> tearing down after the failure (log: %s/teardown.log) ... ' "$LOGS"
    (cleanup) >"$LOGS/teardown.log" 2>&1 && echo done || echo "incomplete, see the log"
  fi
  exit 1
}

# ---- helpers ------------------------------------------------------------------------------------------

# `unshare` and the namespace's init (a bash, PID 1 inside), found by the marker in their command line.
namespace_holders() { pgrep -f -- "smoke-sshd $STATE" || true; }

namespace_init() {
  local pid
  for pid in $(namespace_holders); do
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = bash ]; then echo "$pid"; return 0; fi
  done
}

# Host PIDs of every process in the head's PID namespace, but its init and sshd.
namespace_processes() {
  local init ns pid
  init=$(namespace_init)
  [ -n "$init" ] || return 0
  ns=$(readlink "/proc/$init/ns/pid")
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$pid" = "$init" ] && continue
    [ "$(readlink "/proc/$pid/ns/pid" 2>/dev/null)" = "$ns" ] || continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sshd ] && continue
    echo "$pid"
  done
}

# Host PIDs of processes of this cluster wherever they are: their command line names its temp dir.
cluster_processes() {
  pgrep -f -- "$RAY_TMP" || true
}

listening() {  # listening sockets on the given ports, with their processes
  local port out=""
  for port in "$@"; do
    out+=$(ss -Hltnp "sport = :$port")
  done
  printf '%s' "$out"
}

runtime_updates_configured() {  # "on" if configs/serve.yaml enables /v1/load_lora_adapter
  "$BIN/python" - <<'EOF'
import yaml
app = yaml.safe_load(open("configs/serve.yaml"))["applications"][0]
env = (app.get("runtime_env") or {}).get("env_vars") or {}
flag = str(env.get("RAYLORA_ALLOW_RUNTIME_LORA_UPDATING", "")).lower() in ("1", "true", "yes")
print("on" if flag or app["args"]["engine"].get("allow_runtime_lora_updating") else "off")
EOF
}

# ---- steps ------------------------------------------------------------------------------------------------

cleanup() {
  if [ -f "$CLUSTER_FILE" ] && [ -n "$(namespace_init)" ]; then
    echo "a cluster of an earlier run: ray down"
    timeout 300 "$BIN/ray" down -y "$CLUSTER_FILE" || echo "ray down failed; its namespace is stopped next"
  fi
  local pid
  pid=$(namespace_init)
  if [ -n "$pid" ]; then
    # SIGKILL to the namespace's PID 1 kills every process left in it (unshare ignores SIGTERM).
    echo "stopping the smoke's sshd namespace (init $pid): every process left in it dies with it"
    kill -9 "$pid"
    for _ in $(seq 50); do [ -z "$(namespace_holders)" ] && break; sleep 0.2; done
  fi
  for pid in $(cluster_processes); do
    echo "killing leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$RAY_TMP" "/tmp/cluster-$CLUSTER_NAME.state" "/tmp/cluster-$CLUSTER_NAME.lock"
  if grep -qsF "\"cluster_name\": \"$CLUSTER_NAME\"" ~/ray_bootstrap_config.yaml; then  # JSON, by ray up
    rm -f ~/ray_bootstrap_config.yaml ~/ray_bootstrap_key.pem
  fi
  rm -f "$KEY" "$KEY.pub" "$STATE/authorized_keys" "$STATE/auth_token"
}

preflight() {
  [ "$(id -u)" = 0 ] || { echo "run as root: the script installs and starts sshd"; return 1; }
  [ -x "$BIN/ray" ] || { echo "no $BIN/ray: run ./scripts/setup_venv.sh first"; return 1; }
  local held
  held=$(listening 22 $RAY_PORTS)
  if [ -n "$held" ]; then
    echo "ports this cluster needs are taken (22 $RAY_PORTS):"
    echo "$held"
    return 1
  fi
  echo "ports 22 $RAY_PORTS are free; other Ray instances on this machine:"
  pgrep -a gcs_server || echo "  none"
}

start_sshd() {
  if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server rsync
  fi
  ssh-keygen -A                      # host keys, if the package did not make them
  mkdir -p /run/sshd
  ssh-keygen -q -t ed25519 -N '' -C raylora-cluster-smoke -f "$KEY"
  install -m 600 "$KEY.pub" "$STATE/authorized_keys"
  [ -f ~/.bashrc ] || touch ~/.bashrc
  cp ~/.bashrc "$STATE/bashrc"       # the head's ~/.bashrc inside the namespace: setup commands edit this copy
  # PID 1 of the namespace is a bash that reaps what Ray's daemons leave. The fds this script inherited
  # (a caller's flock on the shared test lock) are closed first: the namespace outlives the step.
  (
    for fd in $(ls "/proc/$BASHPID/fd"); do
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
    exec unshare --pid --mount --fork --mount-proc --propagation private --kill-child=SIGKILL bash -c '
      mount --bind "$1/bashrc" "$HOME/.bashrc"
      /usr/sbin/sshd -D -e -o ListenAddress=127.0.0.1 -o Port=22 -o PidFile=none \
          -o AuthorizedKeysFile="$1/authorized_keys" -o PasswordAuthentication=no \
          -o PermitRootLogin=prohibit-password &
      wait $!' smoke-sshd "$STATE" </dev/null >"$LOGS/sshd.log" 2>&1
  ) &
  for _ in $(seq 50); do
    if ssh "${SSH_OPTS[@]}" root@127.0.0.1 true 2>/dev/null; then
      echo "sshd (in the namespace of init $(namespace_init)) accepts the throwaway key on 127.0.0.1:22"
      return 0
    fi
    sleep 0.2
  done
  cat "$LOGS/sshd.log"
  return 1
}

render() {
  "$BIN/python" scripts/cluster_smoke_config.py --key "$KEY" --temp-dir "$RAY_TMP" --agent-port "$AGENT_PORT" \
    --cluster-name "$CLUSTER_NAME" --out "$CLUSTER_FILE"
  cat "$CLUSTER_FILE"
}

tiny_model() {
  if [ -f .demo/tiny/manifest.json ]; then
    echo ".demo/tiny exists (configs/serve.yaml's relative paths point there)"
  else
    "$BIN/raylora" make-tiny .demo/tiny
  fi
}

# Ray 2.60 turns token authentication on for a head that finds a token in ~/.ray/auth_token (from 2.61,
# for every cluster); clients then need RAY_AUTH_MODE=token and that token. Fetched as any client would.
fetch_token() {
  rm -f "$STATE/auth_token"
  if "$BIN/ray" exec "$CLUSTER_FILE" 'test -s ~/.ray/auth_token'; then
    "$BIN/ray" rsync-down "$CLUSTER_FILE" '~/.ray/auth_token' "$STATE/auth_token"
    chmod 600 "$STATE/auth_token"
    echo "the head uses token authentication: its token is in $STATE/auth_token"
  else
    echo "the head has no token: authentication is disabled"
  fi
}

wait_for_head() {
  for _ in $(seq 120); do
    if "$BIN/ray" status --address 127.0.0.1:6379 && "$BIN/ray" job list --address "$DASHBOARD"; then
      "$BIN/ray" exec "$CLUSTER_FILE" 'echo "ray on the head: $(command -v ray); the raylet runs in $(readlink /proc/$(pgrep -x raylet)/cwd)"'
      return 0
    fi
    sleep 1
  done
  return 1
}

wait_running() {
  local status
  for _ in $(seq 300); do
    status=$("$BIN/serve" status --address "$DASHBOARD" | "$BIN/python" -c '
import sys, yaml
apps = (yaml.safe_load(sys.stdin) or {}).get("applications") or {}
print((apps.get(sys.argv[1]) or {}).get("status", "MISSING"))' "$APP")
    echo "$(date +%T) $APP: $status"
    case $status in
      RUNNING) "$BIN/serve" status --address "$DASHBOARD"; return 0 ;;
      DEPLOY_FAILED|UNHEALTHY) "$BIN/serve" status --address "$DASHBOARD"; return 1 ;;
    esac
    sleep 2
  done
  return 1
}

echo_config() {
  "$BIN/serve" config --address "$DASHBOARD" | tee "$STATE/serve-config.yaml"
  "$BIN/python" - "$STATE/serve-config.yaml" <<'EOF'
import sys, yaml
deployed = [doc for doc in yaml.safe_load_all(open(sys.argv[1])) if doc]
[expected] = yaml.safe_load(open("configs/serve.yaml"))["applications"]
[app] = [doc for doc in deployed if doc.get("name") == expected["name"]]
for key in ("import_path", "route_prefix", "runtime_env", "args"):
    assert app.get(key) == expected[key], f"serve config's {key} differs from configs/serve.yaml: {app.get(key)!r}"
print("serve config echoes configs/serve.yaml's application")
EOF
}

submit_job() {
  "$BIN/ray" job submit --address "$DASHBOARD" -- python scripts/cluster_smoke_job.py --app-name "$APP" \
    | tee "$STATE/job.log"
  grep -q "succeeded" "$STATE/job.log"
}

count() {  # entries in `ray list --format json` output, which is a message instead of [] when empty
  "$BIN/python" -c 'import json, sys; out = sys.argv[1].strip()
print(len(json.loads(out)) if out.startswith("[") else 0 if "No resource" in out else "?")' "$1"
}

nothing_scheduled() {  # after serve shutdown: no actor alive, no placement group kept
  local actors groups
  for _ in $(seq 60); do
    actors=$("$BIN/ray" list actors --address "$DASHBOARD" --filter "state=ALIVE" --format json)
    groups=$("$BIN/ray" list placement-groups --address "$DASHBOARD" --filter "state!=REMOVED" --format json)
    if [ "$(count "$actors")" = 0 ] && [ "$(count "$groups")" = 0 ]; then
      echo "no actor alive, no placement group left"
      return 0
    fi
    sleep 1
  done
  echo "still alive: $actors"
  echo "placement groups: $groups"
  return 1
}

nothing_left() {
  local left ports
  for _ in $(seq 30); do
    left=$( (namespace_processes; cluster_processes) | sort -u)
    ports=$(listening $RAY_PORTS)
    [ -z "$left" ] && [ -z "$ports" ] && break
    sleep 1
  done
  if [ -n "$left" ] || [ -n "$ports" ]; then
    for pid in $left; do echo "left: $pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-150)"; done
    echo "listening: $ports"
    return 1
  fi
  echo "no Ray process left on the head, none listening on $RAY_PORTS"
  mv "$CLUSTER_FILE" "$CLUSTER_FILE.done"    # down already: cleanup only stops the sshd and removes files
  cleanup
  ports=$(listening 22)
  [ -z "$ports" ] || { echo "sshd still listening: $ports"; return 1; }
  echo "the smoke's sshd is stopped; port 22 is free"
}

# ---- the run ----------------------------------------------------------------------------------------------

mkdir -p "$STATE"
chmod 700 "$STATE"
rm -rf "$LOGS"
mkdir -p "$LOGS"
echo "raylora cluster smoke: logs in $LOGS"
started_all=$(now)
step cleanup cleanup
step preflight --show preflight
step sshd start_sshd
step render-cluster-file render
step tiny-model tiny_model
step ray-up timeout 1200 "$BIN/ray" up -y --no-config-cache "$CLUSTER_FILE"
step auth-token fetch_token
if [ -s "$STATE/auth_token" ]; then
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
fi
step wait-for-head --show wait_for_head
step serve-deploy "$BIN/serve" deploy configs/serve.yaml --address "$DASHBOARD"
step serve-status-running wait_running
step openai-client --show "$BIN/python" scripts/cluster_smoke_http.py --base-url http://127.0.0.1:8000/v1 \
  --runtime-updates "$(runtime_updates_configured)"
step serve-config echo_config
step ray-job-ray-get --show submit_job
step serve-shutdown "$BIN/serve" shutdown -y --address "$DASHBOARD"
step no-actors-or-pgs --show nothing_scheduled
step ray-down timeout 600 "$BIN/ray" down -y "$CLUSTER_FILE"
step nothing-left --show nothing_left
echo
echo "cluster smoke passed in $(awk -v a="$started_all" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s:"
printf '  %s\n' "${SUMMARY[@]}"
