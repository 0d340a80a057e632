"""Status model, unix-socket JSON control API and ubus shim."""
