"""What the tests share: fixtures and helpers per topic (bus, ecflow, guiserver, soma, wms), the
event recorder, the loopback listener check, the attacker script, the cluster and conformance
harnesses. Imported as ``support.<module>``; the scripts run as ``python -m support.<module>``."""
