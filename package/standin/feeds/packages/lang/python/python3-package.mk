# Stand-in for openwrt/packages lang/python/python3-package.mk (see
# ../../../../rules.mk). Py3Package gives a package the install section the
# feed gives it: the package's own Py3Package/<name>/install hook, then the
# default filespec (all of PYTHON3_PKG_DIR from PKG_INSTALL_DIR, where the wheel
# was installed), compiled to legacy-layout .pyc files next to where the
# sources were (-b, path names as on the router: -d /), with a fixed hash seed
# for reproducible bytes, and the .py sources and empty folders removed.
# package/ipk.py installs the wheel with /usr/bin/python3 as the scripts'
# interpreter, which is what the feed's FixShebang step leaves.

PYTHON3_PKG_DIR := /usr/lib/python$(PYTHON3_VERSION)/site-packages

define Py3Package
  ifneq ($(origin Py3Package/$(1)/filespec),undefined)
    $$(error Py3Package/$(1)/filespec is set: the stand-in knows only the default filespec)
  endif

  ifndef Package/$(1)/install
    define Package/$(1)/install
	$$(call Py3Package/$(1)/install,$$(1))
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
	$(FIND) $$(1) -name '*.exe' -delete
	PYTHONHASHSEED=$(SOURCE_DATE_EPOCH) SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
		$(HOST_PYTHON3_BIN) -m compileall -q -r 20 -b -d / $$(1)
	$(FIND) $$(1) -type f -name '*.py' -delete
	$(FIND) $$(1) -mindepth 1 -empty -type d -delete
    endef
  endif
endef
