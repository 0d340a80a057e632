# Stand-in for the OpenWrt buildroot's rules.mk, used by package/ipk.py to
# evaluate package/python-oe/Makefile on a host without the SDK. It defines only
# what that Makefile and the other stand-ins use, with the buildroot's values:
# the install commands' modes are the ones the SDK's packages get (a UCI config
# installed with INSTALL_CONF is 0600).
INCLUDE_DIR ?= $(TOPDIR)/include
BUILD_DIR ?= $(TOPDIR)/build_dir
INSTALL_DIR := install -d -m0755
INSTALL_BIN := install -m0755
INSTALL_DATA := install -m0644
INSTALL_CONF := install -m0600
CP := cp -fpR
FIND := find
