# Stand-in for the luci feed's luci.mk (see ../../rules.mk), used by
# package/ipk.py to evaluate package/luci-app-oe/Makefile on a host without the
# SDK. It gives a LuCI package what luci.mk gives it: the definition from the
# LUCI_* variables (section luci, category LuCI, submenu "3. Applications" for
# an app, TITLE, DEPENDS, PKGARCH, URL, MAINTAINER; VERSION is PKG_VERSION, as
# luci.mk's), the description, luci.mk's postinst (drop LuCI's caches, HUP
# rpcd so it reads the new ACL), and its install section for htdocs/ (to /www)
# and root/ (to /), copied with cp -pR as luci.mk does. Not done here: the
# JavaScript/CSS minification (CONFIG_LUCI_JSMIN/CSSTIDY; the files ship as
# written), translations (po/: none), and luasrc/, ucode/ or src/, which this
# app does not have (refused, so a recipe that gains them is not half built).

LUCI_NAME?=$(notdir ${CURDIR})
LUCI_TYPE?=$(word 2,$(subst -, ,$(LUCI_NAME)))
LUCI_SECTION?=luci
LUCI_CATEGORY?=LuCI
LUCI_URL?=https://github.com/openwrt/luci
LUCI_MAINTAINER?=OpenWrt LuCI community
LUCI_MENU.app=3. Applications
HTDOCS = /www

PKG_NAME?=$(LUCI_NAME)
PKG_RELEASE?=1

ifneq ($(wildcard ${CURDIR}/luasrc ${CURDIR}/ucode ${CURDIR}/src),)
  $(error $(LUCI_NAME): luasrc/, ucode/ and src/ are not supported by the stand-in luci.mk)
endif
ifeq ($(PKG_VERSION),)
  $(error $(LUCI_NAME): set PKG_VERSION (luci.mk would take one from git))
endif

include $(INCLUDE_DIR)/package.mk

define Package/$(PKG_NAME)
  SECTION:=$(LUCI_SECTION)
  CATEGORY:=$(LUCI_CATEGORY)
  SUBMENU:=$(LUCI_MENU.$(LUCI_TYPE))
  TITLE:=$(if $(LUCI_TITLE),$(LUCI_TITLE),LuCI $(LUCI_NAME) $(LUCI_TYPE))
  DEPENDS:=$(LUCI_DEPENDS)
  VERSION:=$(PKG_VERSION)
  $(if $(LUCI_PKGARCH),PKGARCH:=$(LUCI_PKGARCH))
  URL:=$(LUCI_URL)
  MAINTAINER:=$(LUCI_MAINTAINER)
endef

ifneq ($(LUCI_DESCRIPTION),)
 define Package/$(PKG_NAME)/description
   $(strip $(LUCI_DESCRIPTION))
 endef
endif

# The blank first line: the install text is expanded into a rule and evaluated, so its
# " ifneq" lines (a space, not a tab) are make conditionals, as in luci.mk.
define Package/$(PKG_NAME)/install

 ifneq ($(wildcard ${CURDIR}/htdocs),)
	$(INSTALL_DIR) $(1)$(HTDOCS)
	cp -pR $(CURDIR)/htdocs/* $(1)$(HTDOCS)/
 endif
 ifneq ($(wildcard ${CURDIR}/root),)
	$(INSTALL_DIR) $(1)/
	cp -pR $(CURDIR)/root/* $(1)/
 endif
endef

ifndef Package/$(PKG_NAME)/postinst
define Package/$(PKG_NAME)/postinst
[ -n "$${IPKG_INSTROOT}" ] || { \
	rm -f /tmp/luci-indexcache.*
	rm -rf /tmp/luci-modulecache/
	killall -HUP rpcd 2>/dev/null
	exit 0
}
endef
endif

$(eval $(call BuildPackage,$(PKG_NAME)))
