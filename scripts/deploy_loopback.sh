#!/usr/bin/env bash
# A fedgin deployment on loopback, with Flower's own processes, to try the multi-host setup of
# docs/deployment.md on one machine: one SuperLink (TLS + SuperNode authentication), one
# SuperNode per site with its own key and node config, `flwr run` of this repository, then every
# process stopped by PID.
#
#   scripts/deploy_loopback.sh OUT_DIR NAME=DATASET [NAME=DATASET ...]
#   scripts/deploy_loopback.sh /tmp/loop ct=/data/Dataset801_AbdomenCT mri=/data/Dataset802_AbdomenMR
#
# DATASET may end in :CT or :MRI (a mixed AMOS folder). Environment (optional):
#   ROUNDS (2), LOCAL_EPOCHS (1), STRATEGY (fedavg), SEED (0), GIN (true), PRESET (quick),
#   RUN_CONFIG   extra `--run-config` items, e.g. "min-sites=1"
#   CONFIG_FILE  a fedgin config.json to run instead of the keys above (its sites' names must be
#                the NAMEs given here; its out is the run dir)
#   PYTHON       interpreter with fedgin installed (default: .venv/bin/python of this repository)
#   SUPERLINK_PORT  (default: a free port)
# Writes OUT_DIR/certs (CA, server cert, node keys), OUT_DIR/logs, OUT_DIR/flwr-home (the flwr
# CLI's config.toml), OUT_DIR/nodes/NAME (each SuperNode's FLWR_HOME, state and cache) and the run
# dir OUT_DIR/run. The exit status is flwr run's, or 1 if no checkpoint was written.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$1"; shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
export PATH="$BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

PIDS=()
descendants() {  # every descendant of $1; SuperExec children run in their own session
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do echo "$child"; descendants "$child"; done
}
cleanup() {
  local status=$? tree=() pid
  for pid in "${PIDS[@]}"; do tree+=("$pid" $(descendants "$pid")); done
  if [ ${#tree[@]} -gt 0 ]; then
    echo "stopping ${#tree[@]} process(es): ${tree[*]}"
    kill "${tree[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      alive=(); for pid in "${tree[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
      [ ${#alive[@]} -eq 0 ] && break; sleep 0.1
    done
    for pid in "${tree[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NAMES=(); DIRS=(); MODS=()
for item in "$@"; do
  case "$item" in *=*) ;; *) echo "expected NAME=DATASET, got '$item'" >&2; exit 2;; esac
  name="${item%%=*}"; dataset="${item#*=}"
  # the modality decides nothing for nnU-Net folders (dataset.json does); it picks one of AMOS
  found="$("$PYTHON" - "$dataset" <<'PY'
import re, sys
from pathlib import Path
from fedgin.data.datasets import open_dataset
from fedgin.errors import FedginError
from fedgin.data.labels import get_scheme
path, modality = sys.argv[1], None
match = re.search(r":(CT|MRI|MR)$", path, flags=re.IGNORECASE)
if match:
    path, modality = path[: match.start()], match.group(1)
try:
    print(f"{Path(path).resolve()}\t{open_dataset(path, get_scheme('abdomen5'), modality=modality).modality}")
except FedginError as exc:
    sys.exit(f"error: {exc}")
PY
)" || exit 2
  IFS=$'\t' read -r dir modality <<< "$found"
  NAMES+=("$name"); DIRS+=("$dir"); MODS+=("$modality")
  echo "site $name: $modality $dir"
done
THREADS=$(( $(nproc) / ${#NAMES[@]} )); [ "$THREADS" -ge 1 ] || THREADS=1

free_ports() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r -a PORTS <<< "$(free_ports $(( ${#NAMES[@]} + 1 )))"
PORT="${SUPERLINK_PORT:-${PORTS[0]}}"
CERTS="$OUT/certs"; LOGS="$OUT/logs"; HOME_CLI="$OUT/flwr-home"
mkdir -p "$LOGS" "$HOME_CLI"

# 1) a CA, the SuperLink's certificate for 127.0.0.1/localhost, one key pair per site
"$PYTHON" -m fedgin.federated.certs "$CERTS" --host 127.0.0.1 --host localhost \
  $(printf -- "--node %s " "${NAMES[@]}")

# 2) the SuperLink: TLS, SuperNode authentication, no dependency installation at run time
FLWR_HOME="$OUT/superlink" "$BIN/flower-superlink" \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$PORT" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
echo "superlink pid $! on https://127.0.0.1:$PORT"
"$PYTHON" - "$PORT" "$CERTS/ca.crt" "${PIDS[0]}" <<'PY'
import os, ssl, sys, time, urllib.request
port, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=2)
        sys.exit(0)
    except OSError:
        os.kill(pid, 0)  # raises if the SuperLink died
        time.sleep(0.2)
sys.exit("the SuperLink did not come up within 60 s")
PY

# 3) the flwr CLI's connection (its config file is $FLWR_HOME/config.toml)
cat > "$HOME_CLI/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
root-certificates = "$CERTS/ca.crt"
TOML
export FLWR_HOME="$HOME_CLI"

# 4) register each site's public key, then start its SuperNode
for i in "${!NAMES[@]}"; do
  name="${NAMES[$i]}"
  flwr supernode register "$CERTS/$name.pub" loopback > "$LOGS/register-$name.log" 2>&1 \
    || { cat "$LOGS/register-$name.log"; exit 1; }
  node="$OUT/nodes/$name"; mkdir -p "$node"
  FLWR_HOME="$node/flwr-home" FEDGIN_CACHE_DIR="$node/cache" OMP_NUM_THREADS="$THREADS" \
  "$BIN/flower-supernode" --superlink "127.0.0.1:$PORT" --root-certificates "$CERTS/ca.crt" \
    --auth-supernode-private-key "$CERTS/$name" --port "${PORTS[$((i + 1))]}" \
    --node-config "data-dir='${DIRS[$i]}' modality='${MODS[$i]}' site-name='$name' state-dir='$node/state'" \
    > "$LOGS/supernode-$name.log" 2>&1 &
  PIDS+=($!)
  echo "supernode $name pid $!"
done
for i in "${!NAMES[@]}"; do
  for _ in $(seq 600); do
    grep -q "SuperNode ID" "$LOGS/supernode-${NAMES[$i]}.log" && break
    kill -0 "${PIDS[$((i + 1))]}" 2>/dev/null || { tail -5 "$LOGS/supernode-${NAMES[$i]}.log"; exit 1; }
    sleep 0.1
  done
  grep -q "SuperNode ID" "$LOGS/supernode-${NAMES[$i]}.log" || { echo "supernode ${NAMES[$i]} did not connect"; exit 1; }
done

# 5) the run: the server's sites list only names the sites (and their order); each SuperNode's
#    node config says where its data is
if [ -n "${CONFIG_FILE:-}" ]; then
  RC="config-file='$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")'"
  RUN_DIR="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["out"])' "$CONFIG_FILE")"
else
  RUN_DIR="$OUT/run"
  RC="sites='$(printf '%s=- ' "${NAMES[@]}" | sed 's/ $//')' out='$RUN_DIR' rounds=${ROUNDS:-2}"
  RC+=" local-epochs=${LOCAL_EPOCHS:-1} strategy='${STRATEGY:-fedavg}' seed=${SEED:-0} gin=${GIN:-true}"
  RC+=" preset='${PRESET:-quick}' ${RUN_CONFIG:-}"
fi
echo "flwr run $REPO loopback --stream --run-config \"$RC\""
status=0
flwr run "$REPO" loopback --stream --run-config "$RC" 2>&1 | tee "$LOGS/flwr-run.log" || status=$?
if [ ! -f "$RUN_DIR/checkpoints/last.pt" ]; then
  echo "no checkpoint in $RUN_DIR (logs in $LOGS)" >&2
  exit 1
fi
echo "run dir: $RUN_DIR"
exit "$status"
