#!/usr/bin/env bash
# deploy/local-cluster.sh: a courier cluster on this one machine, on loopback.
#
# Starts its own NATS JetStream (1 or 3 nodes; nats-server >= 2.12 is needed
# for the JetStream mailbox), then one courier process per role instance:
# GATEWAYS gateway processes (each with its own port and its own open-file
# limit, which is how benchmarks go past one process's ~20,000 connections),
# one api process and WORKERS worker processes, against the local Redis and
# PostgreSQL. It prints the URLs, and stops everything it started on Ctrl-C
# (or SIGTERM), gateways first so that they drain.
#
# Usage:  deploy/local-cluster.sh            # from the repository root
#
# Settings (environment):
#   GATEWAYS=3            gateway processes, on ports BASE_PORT+1 ...
#   WORKERS=1             worker processes
#   BASE_PORT=18080       the api process listens here; gateways above it,
#                         workers after the gateways
#   NATS_NODES=1          1, or 3 for a 3-node NATS cluster (then REPLICAS=3)
#   NATS_PORT=14222       client port of the first NATS node (+1, +2 for the others)
#   REPLICAS=$NATS_NODES  JetStream mailbox stream replicas
#   NATS_SERVER=          path of a nats-server >= 2.12 to use; by default one in
#                         PATH if new enough, else built from the module this
#                         repository pins (go build github.com/nats-io/nats-server/v2)
#   REDIS=redis://127.0.0.1:6379/0
#   POSTGRES=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable
#   PREFIX=courier-local  Redis key prefix and PostgreSQL schema (one per cluster,
#                         so that several can share the servers)
#   WORK=                 directory for binaries, data and logs (default: a new
#                         temporary one, removed at exit unless KEEP=1)
#   COURIER_FLAGS=        extra flags for every courier serve
set -euo pipefail

GATEWAYS=${GATEWAYS:-3}
WORKERS=${WORKERS:-1}
BASE_PORT=${BASE_PORT:-18080}
NATS_NODES=${NATS_NODES:-1}
NATS_PORT=${NATS_PORT:-14222}
REPLICAS=${REPLICAS:-$NATS_NODES}
REDIS=${REDIS:-redis://127.0.0.1:6379/0}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}
PREFIX=${PREFIX:-courier-local}
KEEP=${KEEP:-0}
COURIER_FLAGS=${COURIER_FLAGS:-}

die() { echo "local-cluster: $*" >&2; exit 1; }

[[ -f go.mod && -d cmd/courier ]] || die "run me from the repository root"
[[ $NATS_NODES == 1 || $NATS_NODES == 3 ]] || die "NATS_NODES must be 1 or 3"
(( GATEWAYS >= 1 && WORKERS >= 1 )) || die "need at least one gateway and one worker"

if [[ -z ${WORK:-} ]]; then
	WORK=$(mktemp -d /tmp/courier-local.XXXXXX)
else
	mkdir -p "$WORK"
fi
mkdir -p "$WORK/bin" "$WORK/log"

# Every process we start, in start order; stopped in reverse (gateways are
# started last, so they drain first).
PIDS=()
NAMES=()
stopping=0
stop_all() {
	(( stopping )) && return
	stopping=1
	trap - INT TERM EXIT
	echo
	echo "local-cluster: stopping"
	for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
		kill -TERM "${PIDS[$i]}" 2>/dev/null || true
	done
	for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
		# A graceful drain takes up to the shutdown timeout (20 s).
		for _ in $(seq 1 250); do
			kill -0 "${PIDS[$i]}" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "${PIDS[$i]}" 2>/dev/null; then
			echo "local-cluster: ${NAMES[$i]} (pid ${PIDS[$i]}) still running; killing it"
			kill -KILL "${PIDS[$i]}" 2>/dev/null || true
		fi
		wait "${PIDS[$i]}" 2>/dev/null || true
	done
	if [[ $KEEP == 1 ]]; then
		echo "local-cluster: data and logs kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name, then the command
	local name=$1; shift
	"$@" >"$WORK/log/$name.log" 2>&1 &
	PIDS+=($!)
	NAMES+=("$name")
}

# wait_http url name: until url answers 200, or the process died.
wait_http() {
	local url=$1 name=$2 pid=${PIDS[-1]}
	for _ in $(seq 1 300); do
		if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || { tail -20 "$WORK/log/$name.log" >&2; die "$name exited"; }
		sleep 0.1
	done
	tail -20 "$WORK/log/$name.log" >&2
	die "$name not ready at $url after 30 s"
}

# The open-file limit: each gateway gets the hard limit (courier serve also
# raises its soft limit to the hard one).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "local-cluster: building courier into $WORK/bin"
go build -o "$WORK/bin/courier" ./cmd/courier

nats_ok() { # is "$1 --version" at least 2.12?
	local v
	v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
	[[ -n $v ]] || return 1
	set -- $v
	(( $1 > 2 || ($1 == 2 && $2 >= 12) ))
}
if [[ -n ${NATS_SERVER:-} ]]; then
	nats_ok "$NATS_SERVER" || die "$NATS_SERVER is not nats-server >= 2.12"
elif command -v nats-server >/dev/null && nats_ok "$(command -v nats-server)"; then
	NATS_SERVER=$(command -v nats-server)
else
	echo "local-cluster: building nats-server (the version go.mod pins) into $WORK/bin"
	go build -o "$WORK/bin/nats-server" github.com/nats-io/nats-server/v2
	NATS_SERVER=$WORK/bin/nats-server
fi
echo "local-cluster: $("$NATS_SERVER" --version)"

# Redis and PostgreSQL must already be running.
command -v redis-cli >/dev/null && { redis-cli -u "$REDIS" ping >/dev/null || die "Redis not answering at $REDIS"; }
command -v pg_isready >/dev/null && { pg_isready -d "$POSTGRES" >/dev/null || die "PostgreSQL not answering at $POSTGRES"; }

# NATS: 1 node, or 3 in a cluster (routes on NATS_PORT+100...).
NATS_URLS=()
routes=""
for (( n=0; n<NATS_NODES; n++ )); do
	routes+="${routes:+,}nats://127.0.0.1:$((NATS_PORT + 100 + n))"
done
for (( n=0; n<NATS_NODES; n++ )); do
	port=$((NATS_PORT + n))
	args=(-a 127.0.0.1 -p "$port" -n "nats-$n" -js -sd "$WORK/nats-$n" -m $((NATS_PORT + 200 + n)))
	if (( NATS_NODES > 1 )); then
		args+=(--cluster_name courier-local --cluster "nats://127.0.0.1:$((NATS_PORT + 100 + n))" --routes "$routes")
	fi
	start "nats-$n" "$NATS_SERVER" "${args[@]}"
	NATS_URLS+=("nats://127.0.0.1:$port")
done
for (( n=0; n<NATS_NODES; n++ )); do
	# /healthz?js-enabled-only: JetStream is up (a cluster also needs its
	# meta leader, which the first courier process waits for).
	wait_http "http://127.0.0.1:$((NATS_PORT + 200 + n))/healthz?js-enabled-only=true" "nats-$n"
done
NATS=$(IFS=,; echo "${NATS_URLS[*]}")

common=(--nats "$NATS" --redis "$REDIS" --postgres "$POSTGRES" --replicas "$REPLICAS"
	--redis-prefix "$PREFIX:" --postgres-schema "${PREFIX//-/_}")
# shellcheck disable=SC2206
extra=($COURIER_FLAGS)

serve() { # name, port, roles
	local name=$1 port=$2 roles=$3
	start "$name" "$WORK/bin/courier" serve --role "$roles" --node "$name" \
		--addr "127.0.0.1:$port" --data "$WORK/$name" "${common[@]}" "${extra[@]}"
	wait_http "http://127.0.0.1:$port/v1/ready" "$name"
}

API_URL=http://127.0.0.1:$BASE_PORT
serve api "$BASE_PORT" api
WORKER_PORTS=()
for (( w=1; w<=WORKERS; w++ )); do
	port=$((BASE_PORT + GATEWAYS + w))
	serve "worker-$w" "$port" worker
	WORKER_PORTS+=("$port")
done
GW_URLS=()
for (( g=1; g<=GATEWAYS; g++ )); do
	port=$((BASE_PORT + g))
	serve "gateway-$g" "$port" gateway
	GW_URLS+=("http://127.0.0.1:$port")
done

cat <<EOF

courier local cluster is up ($GATEWAYS gateways, $WORKERS worker(s), NATS x$NATS_NODES R$REPLICAS):
  api          $API_URL/v1              (accounts, keys, HTTP sends)
$(for (( g=0; g<GATEWAYS; g++ )); do printf '  gateway-%-3d %s/v1/ws   (WebSocket; /v1/health, /v1/ready, /metrics)\n' $((g+1)) "${GW_URLS[$g]/http:/ws:}"; done)
$(for (( w=0; w<WORKERS; w++ )); do printf '  worker-%-4d http://127.0.0.1:%s/metrics\n' $((w+1)) "${WORKER_PORTS[$w]}"; done)
  nats         $NATS
  redis        $REDIS (prefix $PREFIX:)
  postgres     $POSTGRES (schema ${PREFIX//-/_})
  logs         $WORK/log/

For tools that take a list of servers:
  COURIER_API=$API_URL
  COURIER_GATEWAYS=$(IFS=,; echo "${GW_URLS[*]}")

Ctrl-C stops everything.
EOF

# Wait until interrupted, or until a process dies.
while true; do
	for i in "${!PIDS[@]}"; do
		if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
			echo "local-cluster: ${NAMES[$i]} exited; last lines of its log:" >&2
			tail -20 "$WORK/log/${NAMES[$i]}.log" >&2
			exit 1
		fi
	done
	sleep 1
done
