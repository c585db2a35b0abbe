"""The ``cdtrain`` command: ML commands from snunet_cbam, service commands from the service packages."""
