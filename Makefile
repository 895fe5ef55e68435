# Each target installs what it needs on a fresh Debian/Ubuntu machine, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# snmpsim refuses to run as root and, once it drops to nobody, cannot read a Python under
# /root: it gets its own venv, made with Debian's python3, somewhere nobody can read.
SNMPSIM_VENV ?= /opt/hubwatch-test/snmpsim-venv
# systemd (systemd-analyze) and strace: the unit tests (verify, security, system call filters)
APT_PACKAGES := mosquitto mosquitto-clients influxdb nut-server nut-client snmp victoria-metrics \
                python3-venv iputils-ping libnss3-tools openssl \
                systemd strace chromium
# The peers the benchmarks measure hubwatch against (bench/agent_footprint.py, bench/wire_bytes.py):
# collectd's core with the libraries its ping, nut and mqtt plugins load, and node-exporter.
BENCH_APT_PACKAGES := collectd-core liboping0 libupsclient6 libmosquitto1 prometheus-node-exporter
export SNMPSIM_VENV

.PHONY: deps apt venv snmpsim test demo bench bench-deps clean

deps: apt venv snmpsim

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# the packages' own daemons are not wanted: tests start their own on free ports
	@-for s in mosquitto influxdb nut-server nut-monitor victoria-metrics; do systemctl disable --now $$s >/dev/null 2>&1; done; true

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[collector,snmp,dev]'
	touch $@

snmpsim: $(SNMPSIM_VENV)/.installed

$(SNMPSIM_VENV)/.installed: Makefile
	mkdir -p $(dir $(SNMPSIM_VENV))
	test -x $(SNMPSIM_VENV)/bin/python || /usr/bin/python3 -m venv $(SNMPSIM_VENV)
	$(SNMPSIM_VENV)/bin/pip install -q snmpsim snmpsim-data pysmi cryptography
	chmod -R a+rX $(dir $(SNMPSIM_VENV))
	touch $@

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: apt venv
	$(VENV)/bin/hubwatch-demo

bench-deps:
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# their own daemons are not wanted: the benchmarks start their own instances
	@-for s in collectd prometheus-node-exporter; do systemctl disable --now $$s >/dev/null 2>&1 || service $$s stop >/dev/null 2>&1; done; true

bench: deps bench-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
