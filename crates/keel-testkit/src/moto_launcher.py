# Starts moto's server (PyPI `moto[server]`) for Keel's tests, with three fixes:
#
# 1. moto's server mode turns each URL regex into a Flask route by deleting every "$", so the
#    Greengrass route ".../deployments/\$reset" becomes ".../deployments/\reset" and
#    ResetDeployments answers 404. The route conversion is wrapped so an escaped "\$" survives
#    as a literal "$".
# 2. IoT certificate ids are the SHA-256 of the certificate's DER, as in AWS. moto computes
#    that only with its `iot.use_valid_cert` setting (otherwise it hashes the PEM text), and
#    its `/moto-api/config` endpoint ignores the `iot` section in moto 5.2, so the setting is
#    made here, before the server starts.
# 3. The server exits when its standard input closes, which happens when the process that
#    started it ends, however it ends (a test binary that finished, or one killed by SIGKILL):
#    no stray servers are left behind.
#
# Arguments are moto_server's own (-H HOST -p PORT).
import os
import sys
import threading


def _exit_when_parent_goes():
    sys.stdin.buffer.read()
    os._exit(0)


threading.Thread(target=_exit_when_parent_goes, daemon=True).start()

try:
    import moto.core.base_backend as base_backend
    from moto.core.config import default_user_config
    from moto.server import main
except ImportError as error:
    sys.stderr.write(f"keel: cannot import moto's server: {error}\n")
    sys.exit(3)

_convert = base_backend.convert_regex_to_flask_path
_MARK = "KEEL_LITERAL_DOLLAR"


def _convert_keeping_escaped_dollar(url_path):
    return _convert(url_path.replace("\\$", _MARK)).replace(_MARK, "$")


base_backend.convert_regex_to_flask_path = _convert_keeping_escaped_dollar
default_user_config.setdefault("iot", {})["use_valid_cert"] = True
main(sys.argv[1:])
