#!/usr/bin/env bash
# Run HERE (a machine that reaches the package registry), before a GPU check: downloads into .whl/ (repo root,
# ignored through .git/info/exclude, never committed) one manylinux CPython-3.12 wheel, --no-deps, of every
# package in benchmarks/gpu_wheels.txt, and builds the ones flagged `build` from their sdist. The GPU machine
# has no registry: benchmarks/gpu_check.sh installs exactly these wheels there with --no-index.
#
#   bash benchmarks/gpu_wheels.sh                      # .whl/ for the GPU machine (cp312)
#   WHEEL_PY=3.11 WHEEL_DIR=/tmp/w bash benchmarks/gpu_wheels.sh   # the same versions for another Python
#
# Fails when a package has no wheel for that Python, when a name ends up with zero or two wheels, or when the
# folder exceeds MAX_MIB (default 40: the whole tree that travels to the GPU machine is limited to 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
LIST="${WHEEL_LIST:-benchmarks/gpu_wheels.txt}"
DEST="${WHEEL_DIR:-.whl}"
PYVER="${WHEEL_PY:-3.12}"
MAX_MIB="${MAX_MIB:-40}"
PY="${PYTHON:-python3}"

if [ "$DEST" = .whl ]; then  # never commit the wheels
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
fi

download=() build=()
while read -r spec flag _; do
  case "$spec" in ''|'#'*) continue ;; esac
  if [ "${flag:-}" = build ]; then build+=("$spec"); else download+=("$spec"); fi
done < "$LIST"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "downloading ${#download[@]} wheels for CPython $PYVER into $DEST"
quiet() {  # pip's output only when it fails (this machine's pip config adds an index of folders it warns about)
  "$@" > "$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; exit 1; }
  rm -f "$tmp/pip.log"
}
quiet "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$tmp" "${download[@]}"
for spec in "${build[@]}"; do  # an sdist: its wheel must be pure Python to serve another interpreter
  echo "building $spec"
  quiet "$PY" -m pip wheel --no-deps -w "$tmp" "$spec"
done
for wheel in "$tmp"/*.whl; do
  case "$(basename "$wheel")" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *-cp"${PYVER/./}"-*|*-py"${PYVER/./}"-*|*-abi3-*) ;;
    *) echo "error: $(basename "$wheel") does not install on CPython $PYVER" >&2; exit 1 ;;
  esac
done

# Exactly one wheel per listed name, at the listed version, and nothing else (two versions of one name stop
# the whole --no-index install there).
"$PY" - "$LIST" "$tmp" <<'EOF'
import pathlib, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = {}
for line in pathlib.Path(sys.argv[1]).read_text().splitlines():
    spec = line.split("#")[0].split()
    if spec:
        name, version = spec[0].split("==")
        wanted[norm(name)] = version
found = {}
for wheel in pathlib.Path(sys.argv[2]).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    found.setdefault(norm(name), []).append(version)
errors = [f"{n}: wanted {v}, got {found.get(n, [])}" for n, v in wanted.items() if found.get(n) != [v]]
errors += [f"{n}: not in the list" for n in found if n not in wanted]
if errors:
    sys.exit("error: " + "; ".join(errors))
EOF

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp" "$DEST"
trap - EXIT
find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -k2 | awk '{printf "%8.1f KiB  %s\n", $1 / 1024, $2}'
total_kib="$(du -sk "$DEST" | cut -f1)"
echo "$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l) wheels, $((total_kib / 1024)) MiB in $DEST"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "error: $DEST is over $MAX_MIB MiB" >&2; exit 1
fi
