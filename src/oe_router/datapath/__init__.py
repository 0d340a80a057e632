"""ESP datapaths behind one interface: kernel XFRM over netlink, userspace ESP over TUN."""
