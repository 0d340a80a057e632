# Stand-in for the buildroot's include/package.mk (see ../rules.mk). BuildPackage
# evaluates a package's definition over the defaults as the buildroot does, and
# for the package named IPK_PACKAGE (the others are ignored):
#   - writes its control fields and its conffiles/postinst/prerm/... defines,
#     expanded once as the buildroot expands them, to files in IPK_META;
#   - adds the rule `ipk-install`, which runs its install section into IPK_DIR.
# package/ipk.py turns those into the .ipk. Nothing else of the buildroot
# (download, patches, cross-compiling, the -src package) is done here.

PKG_INSTALL_DIR ?= $(PKG_BUILD_DIR)/ipkg-install

# The buildroot's defaults for the fields the control file carries; the
# package's own definition overrides them. VERSION is PKG_VERSION-rPKG_RELEASE,
# the form OpenWrt uses since its packages are also built for apk.
define Package/Default
  SECTION:=opt
  CATEGORY:=Extra packages
  DEPENDS:=
  CONFLICTS:=
  PROVIDES:=
  USERID:=
  ALTERNATIVES:=
  MAINTAINER:=$(PKG_MAINTAINER)
  LICENSE:=$(PKG_LICENSE)
  LICENSE_FILES:=$(PKG_LICENSE_FILES)
  SOURCE:=feeds/$(IPK_FEED)/$(notdir $(CURDIR))
  VERSION:=$(PKG_VERSION)$(if $(PKG_RELEASE),-r$(PKG_RELEASE))
  PKGARCH:=$(ARCH)
  TITLE:=
  URL:=
endef

IPK_FIELDS := VERSION DEPENDS CONFLICTS PROVIDES USERID ALTERNATIVES SECTION CATEGORY \
	TITLE URL MAINTAINER LICENSE LICENSE_FILES SOURCE PKGARCH
IPK_DEFINES := description conffiles preinst postinst prerm postrm

define IpkCapture
$(foreach field,$(IPK_FIELDS),$(file >$(IPK_META)/$(field),$(strip $($(field)))))
$(foreach name,$(IPK_DEFINES),$(if $(Package/$(1)/$(name)),$(file >$(IPK_META)/$(name),$(Package/$(1)/$(name)))))
$(file >$(IPK_META)/PKG_NAME,$(PKG_NAME))
ipk-install:
	rm -rf $(IPK_DIR)
	mkdir -p $(IPK_DIR)
	$(call Package/$(1)/install,$(IPK_DIR))
endef

define BuildPackage
$(eval $(Package/Default))
$(eval $(Package/$(1)))
$(if $(filter $(1),$(IPK_PACKAGE)),$(call IpkCapture,$(1)))
endef
