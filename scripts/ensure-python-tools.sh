#!/usr/bin/env bash
# Installs the Python tools the test suite runs, pinned, in a virtual
# environment under target/pytools (nothing system-wide), and exports
# where they are. Sourced by scripts/test.sh.
#
# - kubernetes-validate: validates deploy/k8s/ offline against the
#   Kubernetes schemas it ships (tests/deploy.rs).
# - check-jsonschema: validates deploy/compose.yaml offline against the
#   vendored Compose Specification schema (deploy/schema/, tests/deploy.rs);
#   its YAML loader (ruamel.yaml) also reads the file for the test's checks.
# - openapi-spec-validator: checks that the hub's /v1/openapi.json is a
#   valid OpenAPI 3.1 document (tests/openapi.rs).
# - schemathesis: fuzzes a live hub's API from that document, property
#   based (tests/openapi.rs).

PYTOOLS_DIR="$PWD/target/pytools"

# package, version, the command it installs, the variable tests read.
PYTOOLS=(
  "kubernetes-validate 1.37.0 kubernetes-validate SWITCHYARD_KUBERNETES_VALIDATE"
  "check-jsonschema 0.39.0 check-jsonschema SWITCHYARD_CHECK_JSONSCHEMA"
  "openapi-spec-validator 0.9.0 openapi-spec-validator SWITCHYARD_OPENAPI_SPEC_VALIDATOR"
  "schemathesis 4.32.5 schemathesis SWITCHYARD_SCHEMATHESIS"
)

ensure_python_tools() {
  local bin="$PYTOOLS_DIR/bin" tool package version command variable
  if [ ! -x "$bin/pip" ]; then
    printf 'ensure-python-tools: %s\n' "making a virtual environment in $PYTOOLS_DIR" >&2
    mkdir -p "$PWD/target"
    if ! python3 -m venv "$PYTOOLS_DIR" 2>/dev/null; then
      printf 'ensure-python-tools: %s\n' "installing python3-venv with apt-get" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$PYTOOLS_DIR"
      python3 -m venv "$PYTOOLS_DIR"
    fi
  fi
  for tool in "${PYTOOLS[@]}"; do
    read -r package version command variable <<<"$tool"
    if ! "$bin/pip" show "$package" 2>/dev/null | grep -qx "Version: $version"; then
      printf 'ensure-python-tools: %s\n' "installing $package $version in $PYTOOLS_DIR" >&2
      "$bin/pip" install -q "$package==$version"
    fi
    export "$variable=$bin/$command"
  done
}

ensure_python_tools
