#!/usr/bin/env bash
# System packages for the GUI tests (an X server for napari's OpenGL canvas).
set -euo pipefail
need=()
command -v xvfb-run >/dev/null || need+=(xvfb xauth)
for lib in libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3; do
  dpkg -s "$lib" >/dev/null 2>&1 || need+=("$lib")
done
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (install them as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
