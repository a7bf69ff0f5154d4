#!/usr/bin/env bash
# Makes sure the PostgreSQL server binaries the tests and `make run` start
# are installed: through apt when running as root on Debian/Ubuntu, else it
# stops with the command to run. Called by `make test` and `make run`.
set -euo pipefail

have() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
have && exit 0

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
	echo "ensure-postgres: installing the PostgreSQL server (apt-get install postgresql)" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends postgresql-15 postgresql-client-15 ||
		apt-get install -y -q --no-install-recommends postgresql postgresql-client
	have && exit 0
fi
echo "pgs2 needs the PostgreSQL server binaries (initdb, postgres; 14 or later)." >&2
if command -v apt-get >/dev/null 2>&1; then
	echo "Install them with:  sudo apt-get install -y postgresql" >&2
else
	echo "Install PostgreSQL 14 or later from your system's packages, with initdb on PATH." >&2
fi
exit 1
