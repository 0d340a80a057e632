/*
 * The C33 (IEEE 802.3 clause 33) PSE names that netifd's PoE code takes from the uapi
 * headers of Linux >= 6.11 (<linux/ethtool_netlink.h> and the <linux/ethtool.h> it
 * includes), for older kernel headers: Debian 12's are 6.1. musl-based OpenWrt builds
 * against its own newer kernel's headers, so it never needs this.
 *
 * qemu/userland.py puts this folder first on netifd's include path. This header includes
 * the host's own and adds the missing names as macros, with their values in the kernel ABI
 * (their positions in 6.11's enums; netlink attributes and these states are only ever
 * appended, never renumbered). Nothing is added when the host's headers are 6.11 or newer.
 *
 * ETHTOOL_A_PSE_MAX rises with them: netifd sizes its attribute table by it and then reads
 * the C33 slots, which must lie inside the table. A kernel without C33 PSE support sends
 * none of those attributes, so the slots stay empty.
 */
#include_next <linux/ethtool_netlink.h>

#ifndef OE_UAPI_COMPAT_ETHTOOL_NETLINK_H
#define OE_UAPI_COMPAT_ETHTOOL_NETLINK_H

#include <linux/version.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)

/* enum ethtool_c33_pse_admin_state (linux/ethtool.h) */
#define ETHTOOL_C33_PSE_ADMIN_STATE_UNKNOWN 1
#define ETHTOOL_C33_PSE_ADMIN_STATE_DISABLED 2
#define ETHTOOL_C33_PSE_ADMIN_STATE_ENABLED 3

/* enum ethtool_c33_pse_pw_d_status (linux/ethtool.h) */
#define ETHTOOL_C33_PSE_PW_D_STATUS_UNKNOWN 1
#define ETHTOOL_C33_PSE_PW_D_STATUS_DISABLED 2
#define ETHTOOL_C33_PSE_PW_D_STATUS_SEARCHING 3
#define ETHTOOL_C33_PSE_PW_D_STATUS_DELIVERING 4
#define ETHTOOL_C33_PSE_PW_D_STATUS_TEST 5
#define ETHTOOL_C33_PSE_PW_D_STATUS_FAULT 6
#define ETHTOOL_C33_PSE_PW_D_STATUS_OTHERFAULT 7

/* the ETHTOOL_A_PSE_* attributes after ETHTOOL_A_PODL_PSE_PW_D_STATUS (4) */
#define ETHTOOL_A_C33_PSE_ADMIN_STATE 5
#define ETHTOOL_A_C33_PSE_ADMIN_CONTROL 6
#define ETHTOOL_A_C33_PSE_PW_D_STATUS 7
#define ETHTOOL_A_C33_PSE_PW_CLASS 8
#define ETHTOOL_A_C33_PSE_ACTUAL_PW 9
#define ETHTOOL_A_C33_PSE_EXT_STATE 10
#define ETHTOOL_A_C33_PSE_EXT_SUBSTATE 11
#define ETHTOOL_A_C33_PSE_AVAIL_PW_LIMIT 12
#define ETHTOOL_A_C33_PSE_PW_LIMIT_RANGES 13
#define ETHTOOL_A_PSE_MAX 13

#endif
#endif
