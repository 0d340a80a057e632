"""DNS front, DNSSEC chain validation and IPSECKEY handling."""
