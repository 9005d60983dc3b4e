#!/usr/bin/env bash
# Issue 8, first scenarios: weft agents restarted under continuous traffic on the lab cluster
# (conformance/lab/lab.sh, 3 nodes, the demo's pods and policies).
#
#   bash conformance/lab/handoff-test.sh [--full]
#
# A prober (handoff-prober.py) runs in every pod for the whole test: a new TCP connection (new
# source port) to every other pod, pod IP and Service ClusterIP, ports 8080 and 5432, every
# 0.25 s; plus one long-lived connection per allowed pair that sends a byte every 100 ms and
# wants it echoed (the demo's servers are replaced by echo servers on the same ports). The
# expected state is the demo's truth table (expected-table.txt); scenario 4 switches it to
# handoff-expected-after.txt for the cells it changes, at the moment node 1's agent converged.
#
# Scenarios (one table row each): N negative control (node 1 drops forwarded packets for 2 s:
# the prober must notice); 0 steady state (control); 1a kill -9 of node 1's agent,
# restarted 1 s later; 1b the same on all nodes at once; 2 rolling SIGTERM + restart over the
# nodes; 4 a policy and a pod label changed while node 1's agent is down; 7 agent RSS after
# CHURN_A vs CHURN_B cycles of pod relabel churn (100 vs 300; --full: 100 vs 1000).
# "converged" = seconds from the new agent process's start until its /readyz answers, `weft
# audit` is clean and (4, 7) it applied the API's resourceVersion; "nft ops" = weft_nft_ops_total
# of the new processes then (what adoption sent to the kernel); "watch restarts" =
# weft_watch_restarts_total summed over all nodes.
#
# Env: WEFT_LAB_DIR (default /tmp/weft-lab-handoff), WEFT_LAB_PREFIX (default weft-lh).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/tmp/weft-lab-handoff}
export WEFT_LAB_PREFIX=${WEFT_LAB_PREFIX:-weft-lh}
D=$WEFT_LAB_DIR P=$WEFT_LAB_PREFIX
W=${CARGO_TARGET_DIR:-$REPO/target}/debug/weft
PROBER="$HERE/handoff-prober.py"
CHURN_A=100 CHURN_B=300
[[ ${1:-} == --full ]] && CHURN_B=1000
KEYS=(shop/api shop/db clients/ui clients/batch shop/admin)

work=$(mktemp -d)
bg_pids=()
cleanup() {
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
  bash "$HERE/lab.sh" down >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

passed=0 failed=0
check() { if "$@"; then passed=$((passed + 1)); echo "ok   $*"; else failed=$((failed + 1)); echo "FAIL $*"; fi; }
finish() { echo "handoff-test: $passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit; }
log() { printf '[handoff %s] %s\n' "$(date +%T)" "$*" >&2; }
now() { date +%s.%N; }
kc() { bash "$REPO/conformance/k8s/cluster.sh" kubectl "$D/cluster" "$@"; }
pod_ns() { echo "$P-pod-${1%/*}-${1#*/}"; }
pod_ip() { awk '{print $1}' "$D/pods/${1%/*}_${1#*/}.ips"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }
sock() { echo "$D/run/node$1/agent.sock"; }
metric() { # node name -> sum of the metric's samples
  ip netns exec "$P-node$1" curl -s --max-time 2 "http://$(node_ip "$1"):6784/metrics" \
    | awk -v m="$2" '$1 == m || index($1, m "{") == 1 {s += $2} END {print s + 0}'
}
applied_rv() { # node kind
  curl -s --max-time 2 --unix-socket "$(sock "$1")" http://x/debug/state | jq -r ".kinds.$2.applied_resource_version // 0"
}
# Node i's kernel matches the API: ready, audit clean, and (if given) policies and pods applied
# up to resourceVersion rv.
in_sync() { # i [rv]
  ip netns exec "$P-node$1" curl -sf --max-time 2 "http://$(node_ip "$1"):6784/readyz" >/dev/null || return 1
  "$W" audit --socket "$(sock "$1")" >/dev/null 2>&1 || return 1
  [[ -z ${2:-} ]] && return 0
  (($(applied_rv "$1" networkpolicies) >= $2 && $(applied_rv "$1" pods) >= $2))
}
# Seconds from the start of node i's (new) agent until in_sync, bounded by 90 s ("timeout").
converge() { # i [rv]
  local started deadline=$((SECONDS + 90))
  started=$(cat "$D/run/node$1/agent.started" 2>/dev/null || now)
  until in_sync "$@"; do
    ((SECONDS < deadline)) || { echo timeout; return 1; }
    sleep 0.1
  done
  python3 -c "print(f'{$(now) - $started:.2f}')"
}
watch_restarts() { local s=0 i; for i in 1 2 3; do s=$((s + $(metric "$i" weft_watch_restarts_total))); done; echo $s; }

rows=()
row() { rows+=("$(printf '| %-52s | %6s | %5s | %5s | %-14s | %7s | %14s |' "$@")"); }
# Scores the prober's log over [t0, t1) and records a row; $1 = scenario, rest = judge options.
score() { # name t0 t1 converged nft-ops [judge options...]
  local name=$1 t0=$2 t1=$3 conv=$4 ops=$5; shift 5
  local res sent wrong trans
  res=$(python3 "$PROBER" judge --logs "$work/probes" --from "$t0" --to "$t1" "$@")
  echo "$res" | grep WRONG | head -20 >&2
  read -r sent wrong trans <<<"$(tail -1 <<<"$res" | sed -E 's/sent=([0-9]+) wrong=([0-9]+) transitional=([0-9]+).*/\1 \2 \3/')"
  row "$name" "$sent" "$wrong" "$trans" "$conv" "$ops" "$(watch_restarts)"
  log "$name: $(tail -1 <<<"$res"), converged ${conv}s, nft ops $ops"
  last_wrong=$wrong last_sent=$sent last_res=$(tail -1 <<<"$res")
}
zero_wrong() { [[ $last_sent -gt 100 && $last_wrong -eq 0 ]]; }

# --- the lab, echo servers, probers ------------------------------------------------------
log "lab up in $D (prefix $P)"
bash "$HERE/lab.sh" up 3 >"$work/up.out" 2>"$work/up.err" || { tail -30 "$work/up.err"; failed=1; finish; }
only_tables() { awk '/^TCP /{p=1} /^Look around/{p=0} p' | grep -v '^$'; }
for key in "${KEYS[@]}"; do
  f="$D/pods/${key%/*}_${key#*/}.servers"
  xargs -r kill -KILL <"$f" 2>/dev/null
  ip netns exec "$(pod_ns "$key")" setsid python3 "$PROBER" serve 8080 5432 >/dev/null 2>&1 </dev/null &
  echo $! >"$f"
  disown
done
sleep 1
echo_table() { diff <(bash "$HERE/lab.sh" table 2>/dev/null | only_tables) "$HERE/expected-table.txt"; }
check echo_table
declare -A svc
for key in "${KEYS[@]}"; do svc[$key]=$(kc -n "${key%/*}" get svc "s-${key#*/}" -o jsonpath='{.spec.clusterIP}'); done
mkdir -p "$work/probes"
until=$(($(date +%s) + 1500))
allowed=$(python3 -c "
import importlib.util as u; s=u.spec_from_file_location('p','$PROBER'); m=u.module_from_spec(s); s.loader.exec_module(m)
print(' '.join(c for c, ok in m.read_table('$HERE/expected-table.txt').items() if ok))")
ncells=0 nlong=0
for src in "${KEYS[@]}"; do
  cells=()
  for dst in "${KEYS[@]}"; do
    [[ $src == "$dst" ]] && continue
    for port in 8080 5432; do
      for via in pod service; do
        name="$src>$dst:$port/$via" ip=$(pod_ip "$dst") long=0
        [[ $via == service ]] && ip=${svc[$dst]}
        [[ " $allowed " == *" $name "* ]] && long=1 nlong=$((nlong + 1))
        cells+=("$name=$ip:$port:$long") ncells=$((ncells + 1))
      done
    done
  done
  ip netns exec "$(pod_ns "$src")" python3 "$PROBER" probe --out "$work/probes/${src/\//_}.log" --until "$until" "${cells[@]}" &
  bg_pids+=($!)
  disown
done
log "prober: $ncells cells every 0.25 s, $nlong long-lived connections"
sleep 3

# --- N: negative control: the prober notices an outage ---------------------------------------
# A table of our own in node 1's namespace drops everything forwarded there for 2 s (pods on
# node 1: api, db): the judge must count wrong results and broken long-lived connections.
t0=$(now)
echo 'table inet handoff-blackout { chain blackout { type filter hook forward priority -400; policy drop; }; }' \
  | ip netns exec "$P-node1" nft -f -
sleep 2
ip netns exec "$P-node1" nft delete table inet handoff-blackout
sleep 3; t1=$(now)
score "N negative control: node1 drops forwarding for 2 s" "$t0" "$t1" - - --expect "$HERE/expected-table.txt"
noticed() { [[ $last_wrong -gt 0 ]] && grep -q 'breaks=[1-9]' <<<"$last_res"; }
check noticed

# --- 0: steady state (control) ------------------------------------------------------------
t0=$(now); sleep 8; t1=$(now)
score "0 steady state, no restart (control)" "$t0" "$t1" - - --expect "$HERE/expected-table.txt"
check zero_wrong

# --- 1a: kill -9 of node 1's agent, restarted 1 s later -----------------------------------
t0=$(now)
bash "$HERE/lab.sh" restart-agent 1 KILL 1 2>>"$work/lab.err"
c=$(converge 1); sleep 3; t1=$(now)
score "1a kill -9 node1 agent, restart after 1 s" "$t0" "$t1" "$c" "$(metric 1 weft_nft_ops_total)" --expect "$HERE/expected-table.txt"
check zero_wrong
converged_1a() { [[ $c != timeout ]]; }
check converged_1a

# --- 1b: kill -9 of every agent at once -----------------------------------------------------
t0=$(now)
bash "$HERE/lab.sh" restart-agent all KILL 1 2>>"$work/lab.err"
cs=() ops=0
for i in 1 2 3; do cs+=("$(converge "$i")"); ops=$((ops + $(metric "$i" weft_nft_ops_total))); done
sleep 3; t1=$(now)
score "1b kill -9 all 3 agents at once, restart 1 s" "$t0" "$t1" "$(IFS=/; echo "${cs[*]}")" "$ops" --expect "$HERE/expected-table.txt"
check zero_wrong
converged_1b() { [[ " ${cs[*]} " != *timeout* ]]; }
check converged_1b

# --- 2: rolling SIGTERM + restart over the nodes --------------------------------------------
t0=$(now) cs=() ops=0
for i in 1 2 3; do
  bash "$HERE/lab.sh" restart-agent "$i" TERM 1 2>>"$work/lab.err"
  cs+=("$(converge "$i")"); ops=$((ops + $(metric "$i" weft_nft_ops_total)))
done
sleep 3; t1=$(now)
score "2 rolling SIGTERM + restart, node1..3" "$t0" "$t1" "$(IFS=/; echo "${cs[*]}")" "$ops" --expect "$HERE/expected-table.txt"
check zero_wrong
converged_2() { [[ " ${cs[*]} " != *timeout* ]]; }
check converged_2

# --- 4: a policy and a pod label changed while node 1's agent is down ------------------------
# shop/api-from-ui gains "ui may reach api on 5432"; shop/db is relabelled app=db-v2 (no policy
# selects it any more: its ingress and egress open, batch's egress still blocks batch -> db).
# Every cell this changes is enforced on node 1 only (api and db live there), so until node 1's
# agent is back the old truth holds for them (handoff-expected-after.txt is the new one).
t0=$(now)
bash "$HERE/lab.sh" restart-agent 1 KILL 8 2>>"$work/lab.err" &
rpid=$!
down_pid=$(cat "$D/pids/agent-node1.pid")
for _ in $(seq 50); do kill -0 "$down_pid" 2>/dev/null || break; sleep 0.1; done
kc -n shop patch networkpolicy api-from-ui --type=json -p '[{"op":"add","path":"/spec/ingress/-","value":{"from":[{"namespaceSelector":{"matchLabels":{"team":"web"}},"podSelector":{"matchLabels":{"app":"ui"}}}],"ports":[{"port":5432}]}}]' >/dev/null
rv=$(kc -n shop label pod db app=db-v2 --overwrite -o jsonpath='{.metadata.resourceVersion}')
t_changed=$(now)
# The other nodes follow the API meanwhile.
for i in 2 3; do for _ in $(seq 100); do in_sync "$i" "$rv" && break; sleep 0.1; done; done
wait "$rpid"
changed_while_down() { python3 -c "import sys; sys.exit(0 if $t_changed < $(cat "$D/run/node1/agent.started") else 1)"; }
check changed_while_down
c=$(converge 1 "$rv"); t_conv=$(now)
after_table() { diff <(bash "$HERE/lab.sh" table 2>/dev/null | only_tables) "$HERE/handoff-expected-after.txt"; }
check after_table
sleep 3; t1=$(now)
score "4 policy + pod label changed while node1 down" "$t0" "$t1" "$c" "$(metric 1 weft_nft_ops_total)" \
  --expect "$HERE/expected-table.txt" --after "$HERE/handoff-expected-after.txt" \
  --changed-from "$(cat "$D/run/node1/agent.started")" --changed-to "$t_conv"
check zero_wrong
converged_4() { [[ $c != timeout ]]; }
check converged_4

# --- 7: agent RSS under pod relabel churn -----------------------------------------------------
# clients/ui toggles app=ui <-> app=ui-off (in and out of api-from-ui's peer sets on node 1),
# CHURN_B cycles (even: it ends as app=ui). ui -> api:5432 flips with it: not scored.
rss() { awk '/^VmRSS/ {print $2}' "/proc/$(cat "$D/pids/agent-node1.pid")/status"; }
caught_up() { for _ in $(seq 300); do (($(applied_rv 1 pods) >= $1)) && return 0; sleep 0.1; done; return 1; }
t0=$(now) rss_a=0 rss_b=0
for ((n = 1; n <= CHURN_B; n++)); do
  lbl=ui-off; ((n % 2 == 0)) && lbl=ui
  rv=$(kc -n clients label pod ui "app=$lbl" --overwrite -o jsonpath='{.metadata.resourceVersion}')
  if ((n == CHURN_A)); then caught_up "$rv"; rss_a=$(rss); fi
done
caught_up "$rv"; rss_b=$(rss)
c=$(converge 1 "$rv"); t1=$(now)
ratio=$(python3 -c "print(f'{$rss_b / $rss_a:.3f}')")
score "7 RSS node1: ${rss_a} kB @${CHURN_A} -> ${rss_b} kB @${CHURN_B} (x$ratio)" "$t0" "$t1" - "$(metric 1 weft_nft_ops_total)" \
  --expect "$HERE/handoff-expected-after.txt" --unscored "clients/ui>shop/api:5432/pod,clients/ui>shop/api:5432/service"
check zero_wrong
rss_bounded() { python3 -c "import sys; sys.exit(0 if $rss_b <= 1.1 * $rss_a else 1)"; }
check rss_bounded

echo
printf '| %-52s | %6s | %5s | %5s | %-14s | %7s | %14s |\n' scenario probes wrong trans "converged (s)" "nft ops" "watch restarts"
echo "|------------------------------------------------------|--------|-------|-------|----------------|---------|----------------|"
printf '%s\n' "${rows[@]}"
echo
finish
