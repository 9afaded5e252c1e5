"""Put on PYTHONPATH of a gateway started by a wiring test: installs the stand-ins."""

from tests.standin_translators import install

install()
