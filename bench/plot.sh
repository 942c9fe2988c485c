#!/usr/bin/env bash
# Draws the scale figures that `keel-bench compare --data FILE` appends (tab-separated
# `series server x y` lines) as one PNG of up to four panels, etcd beside keel:
#   put-clients      put requests/s by clients (the KV table's put rows)
#   put-cpu-clients  server CPU µs per put by clients
#   range-keys       serializable random-key reads/s by keys stored (`--store-keys`), by a
#                    freshly restarted server
#   range-keys-after-load  the same reads right after the load, by the server that loaded
#   restart-keys     seconds from spawn to the first answered read after SIGKILL, by keys stored
# When a series was measured more than once, the last figure for each x is drawn.
#
# Usage: bench/plot.sh DATA.tsv OUT.png      (needs gnuplot: apt-get install -y gnuplot-nox)
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 DATA.tsv OUT.png" >&2
    exit 2
fi
data=$1
out=$2
if ! command -v gnuplot >/dev/null; then
    echo "$0: gnuplot is missing (apt-get install -y gnuplot-nox)" >&2
    exit 1
fi
if [[ ! -s $data ]]; then
    echo "$0: no figures in $data (run keel-bench compare --data $data)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One file per series and server, x ascending, the last figure for each x.
series=()
for s in put-clients put-cpu-clients range-keys range-keys-after-load restart-keys; do
    found=0
    for server in etcd keel; do
        awk -F'\t' -v s="$s" -v srv="$server" '$1 == s && $2 == srv { y[$3] = $4 }
            END { for (x in y) print x, y[x] }' "$data" | sort -g >"$tmp/$s-$server"
        [[ -s $tmp/$s-$server ]] && found=1
    done
    if [[ $found == 1 ]]; then
        series+=("$s")
    fi
done
if [[ ${#series[@]} -eq 0 ]]; then
    echo "$0: $data has none of the series this draws" >&2
    exit 1
fi

title() {
    case $1 in
    put-clients) echo "put req/s by clients|clients|requests/s" ;;
    put-cpu-clients) echo "server CPU per put|clients|µs of CPU per put" ;;
    range-keys) echo "random-key serializable range req/s (restarted server)|keys stored|requests/s" ;;
    range-keys-after-load) echo "random-key serializable range req/s right after the load|keys stored|requests/s" ;;
    restart-keys) echo "restart after SIGKILL by store size|keys stored|seconds to first read" ;;
    esac
}

n=${#series[@]}
cols=$((n > 1 ? 2 : 1))
rows=$(((n + 1) / 2))
{
    echo "set terminal pngcairo size $((cols * 640)),$((rows * 440)) font 'sans,10'"
    echo "set output ARG1"
    echo "set multiplot layout $rows,$cols"
    echo "set logscale x"
    echo "set format x '10^{%L}'"
    echo "set grid"
    echo "set key top left"
    echo "set yrange [0:*]"
    for s in "${series[@]}"; do
        IFS='|' read -r t x y <<<"$(title "$s")"
        echo "set title '$t'"
        echo "set xlabel '$x'"
        echo "set ylabel '$y'"
        echo "plot '$tmp/$s-etcd' using 1:2 with linespoints lw 2 pt 7 title 'etcd 3.4', \\"
        echo "     '$tmp/$s-keel' using 1:2 with linespoints lw 2 pt 5 title 'keel'"
    done
    echo "unset multiplot"
} >"$tmp/plot.gp"
# The output path is passed as ARG1, so no quote in it can break the script.
gnuplot -c "$tmp/plot.gp" "$out"
echo "wrote $out"
