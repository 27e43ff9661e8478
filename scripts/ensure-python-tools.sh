#!/usr/bin/env bash
# Installs the Python tools the test suite runs, pinned, in a virtual
# environment under target/pytools (nothing system-wide), and exports
# where they are. Sourced by scripts/test.sh.
#
# - kubernetes-validate: validates deploy/k8s/ offline against the
#   Kubernetes schemas it ships (tests/deploy.rs).

PYTOOLS_DIR="$PWD/target/pytools"
KUBERNETES_VALIDATE_VERSION=1.37.0

ensure_python_tools() {
  local bin="$PYTOOLS_DIR/bin"
  if ! "$bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    printf 'ensure-python-tools: %s\n' "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION in $PYTOOLS_DIR" >&2
    mkdir -p "$PWD/target"
    if ! python3 -m venv "$PYTOOLS_DIR" 2>/dev/null; then
      printf 'ensure-python-tools: %s\n' "installing python3-venv with apt-get" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$PYTOOLS_DIR"
    fi
    "$bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  export SWITCHYARD_KUBERNETES_VALIDATE="$bin/kubernetes-validate"
}

ensure_python_tools

# - check-jsonschema: validates deploy/compose.yaml offline against the
#   vendored Compose Specification schema (deploy/schema/, tests/deploy.rs);
#   its YAML loader (ruamel.yaml) also reads the file for the test's checks.
CHECK_JSONSCHEMA_VERSION=0.39.0

ensure_check_jsonschema() {
  local bin="$PYTOOLS_DIR/bin"
  if ! "$bin/check-jsonschema" --version 2>/dev/null | grep -q "version $CHECK_JSONSCHEMA_VERSION\$"; then
    printf 'ensure-python-tools: %s\n' "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION in $PYTOOLS_DIR" >&2
    if [ ! -x "$bin/pip" ]; then
      mkdir -p "$PWD/target"
      if ! python3 -m venv "$PYTOOLS_DIR" 2>/dev/null; then
        printf 'ensure-python-tools: %s\n' "installing python3-venv with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$PYTOOLS_DIR"
      fi
    fi
    "$bin/pip" install -q "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
  fi
  export SWITCHYARD_CHECK_JSONSCHEMA="$bin/check-jsonschema"
}

ensure_check_jsonschema
